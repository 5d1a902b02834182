"""Mixture-of-experts families (Mixtral, Qwen3-MoE, OLMoE) on tiny random models from their config classes:
per-expert Linears are exact, 16-bit rotation keeps logits and routing, 4-bit methods run, GPTQ reports the tokens
routed to each expert and falls back to RTN for an expert that calibration never reaches."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from osp_eval import preset, quantize_
from osp_eval.arch import get_adapter
from osp_eval.ppl import perplexity

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=4,
                                                             num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=32,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2)),
}


def build(family: str, dtype=torch.float64, seed: int = 0):
    config_cls, model_cls, extra = MOE[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    config._experts_implementation = "eager"  # transformers' reference loop (grouped_mm has no float64)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) * 0.1)  # experts are created empty: give every weight a value
    return model.requires_grad_(False)


def ids(n=2, t=48, seed=1):
    return torch.randint(0, TINY["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


def routing(model, x):
    """Each layer's chosen experts (top-k indices) for input x."""
    ad, seen = get_adapter(model), []
    hooks = [ad.routers(layer)[0].register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
             for layer in ad.layers(model)]
    with torch.no_grad():
        logits = model(input_ids=x).logits
    for h in hooks:
        h.remove()
    return logits, seen


@pytest.mark.parametrize("family", list(MOE))
def test_per_expert_linears_are_exact(family):
    model = build(family)
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
    get_adapter(model).prepare(model)
    lin = get_adapter(model).linears(get_adapter(model).layers(model)[0])
    assert {"gate.3", "up.3", "down.3", "q", "o"} <= set(lin) and "gate" not in lin
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", list(MOE))
def test_rotated_16bit_moe_keeps_logits_and_routing(family):
    x = ids()
    model = build(family)
    get_adapter(model).prepare(model)
    want, want_routes = routing(model, x)
    quantize_(model, preset("osp", rotate=True, center_embeddings=False, w_method="rtn"), progress=False)
    got, routes = routing(model, x)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    assert all(torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(want_routes, routes))


@pytest.mark.parametrize("family", list(MOE))
@pytest.mark.parametrize("method", ["rtn", "gptq", "quarot"])
def test_4bit_moe_methods_run(family, method):
    model = build(family, torch.float32)
    text = ids(1, 4 * 32, seed=2)[0]
    base = perplexity(model, text, seqlen=32, progress=False)["ppl"]
    over = dict(rtn=dict(w_method="rtn"), gptq=dict(w_method="gptq", rotate_down_proj=True),
                quarot=dict(w_method="gptq", rotate=True))[method]
    cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, nsamples=4, calib_seqlen=32, **over)
    quantize_(model, cfg, ids(4, 32, seed=3) if cfg.w_method == "gptq" else None, progress=False)
    ppl = perplexity(model, text, seqlen=32, progress=False)["ppl"]
    assert math.isfinite(ppl) and ppl != base
    if cfg.w_method == "gptq":
        experts = model.osp_gptq_stats["experts"]
        assert len(experts) == 2 and {"gate.0", "up.3", "down.2"} <= set(experts[0])
        # every calibration token goes to top-k = 2 experts: the gate Hessians add up to 2 x tokens
        assert sum(v["samples"] for r, v in experts[0].items() if r.startswith("gate.")) == 2 * 4 * 32


def test_expert_without_calibration_tokens_falls_back_to_rtn():
    """Expert 1 is never chosen (its router logit is masked): no Hessian, so RTN, reported with 0 tokens."""
    model = build("qwen3_moe", torch.float32)
    ad = get_adapter(model)
    ad.prepare(model)

    def never_expert_1(module, args, out):
        logits = out[0].clone()
        logits[:, 1] = float("-inf")
        probs = torch.softmax(logits.float(), -1)
        top, idx = torch.topk(probs, module.top_k, -1)
        return out[0], (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx

    for layer in ad.layers(model):
        ad.routers(layer)[0].register_forward_hook(never_expert_1)
    quantize_(model, preset("osp", w_bits=4, nsamples=4, calib_seqlen=32, w_method="gptq"), ids(4, 32, seed=3),
              progress=False)
    stats = model.osp_gptq_stats
    assert sorted(stats["expert_fallbacks"]) == sorted(f"layer {i} {r}.1" for i in range(2)
                                                       for r in ("down", "gate", "up"))
    rep = stats["experts"][0]
    assert rep["gate.1"]["samples"] == 0 and rep["gate.1"]["method"].startswith("rtn")
    assert rep["gate.0"]["method"] == "gptq" and rep["gate.0"]["samples"] > 0
    w = ad.linears(ad.layers(model)[0])["gate.1"].weight
    assert max(len(torch.unique(row)) for row in w) <= 16  # on the 4-bit grid
    assert all(math.isfinite(v["rel_error"]) and v["rel_error"] > 0 for v in rep.values())


def test_spinquant_trains_on_moe_and_keeps_routing():
    from osp_eval.spinquant import prepare_training_model, save_rotations, train_rotations

    x = ids(2, 32, seed=4)
    model = build("qwen3_moe")
    get_adapter(model).prepare(model)
    want, want_routes = routing(model, x)
    cfg = preset("osp", a_bits=4, k_bits=4, v_bits=4, w_method="gptq", center_embeddings=False)
    rot = prepare_training_model(model, cfg)
    train_rotations(model, rot, x, steps=2, lr=1.5, batch_size=2, progress=False)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = save_rotations(f"{d}/R.bin", rot.state())
        fresh = build("qwen3_moe")
        quantize_(fresh, preset("osp", rotate=True, center_embeddings=False, w_method="rtn",
                                optimized_rotation_path=str(path)), progress=False)
        got, routes = routing(fresh, x)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    assert all(torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(want_routes, routes))


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma3"])
def test_lighteval_runs_on_new_families(family, stories_path, data_dir, tmp_path):
    """The lighteval path end to end on a saved tiny model (a MoE and a post-norm family), W4A4KV4 QuaRot-RTN."""
    import shutil

    from osp_eval.lighteval_run import run_lighteval

    if family == "gemma3":
        from test_families import build as build_dense

        model = build_dense("gemma3", torch.float32)
    else:
        model = build(family, torch.float32)
    model.resize_token_embeddings(512)  # the stories260K tokenizer's vocabulary
    folder = tmp_path / family
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(f"{stories_path}/{f}", folder / f)
    cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", w_clip=False, rotate=True)
    r = run_lighteval(str(folder), cfg, tasks="arc:easy|0", data_dir=data_dir, max_samples=3, batch_size=4,
                      max_length=128, output_dir=str(tmp_path / "out"), progress=False, device="cpu")
    assert 0 <= r["tasks"]["arc:easy"]["value"] <= 1 and r["tasks"]["arc:easy"]["n_samples"] == 3
    assert r["model_fingerprint"]["digest"] and r["identity"]["model"] == r["model_fingerprint"]["digest"]
