"""The vLLM fast path against the Transformers path: same quantized model, same per-token log-probs.

One in-process CPU engine (SmolLM2-135M, fp32) serves every config: each test re-pushes weights and hooks.
Tests of that shared `engine` must come before the ones that start and shut down engines of their own (the CLI and
lighteval runs): vLLM tears down its process groups with an in-process engine, which breaks the shared one.
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM not installed: scripts/setup_vllm.sh")

from osp_eval.apply import quantize_  # noqa: E402
from osp_eval.config import QuantConfig  # noqa: E402
from osp_eval.errors import OspEvalError  # noqa: E402
from osp_eval.ppl import perplexity  # noqa: E402

SEQLEN = 32
# Weight-only configs (rotations, online down_proj Hadamard, untied lm_head): the whole model must match.
# w_clip off: the MSE clip search is slow on CPU and changes nothing about the parity being tested.
FULL = {
    "16-16-16": QuantConfig(),
    "w4_rtn": QuantConfig(w_bits=4, w_clip=False),
    "w4_ffn_had": QuantConfig(w_bits=4, w_clip=False, rotate_down_proj=True),
    "w4_quarot": QuantConfig(w_bits=4, w_clip=False, rotate=True),
}
# Activation-quantized configs: 4-bit (even 8-bit) activation rounding on SmolLM2 turns fp32 GEMM noise
# (1e-6) into O(1) log-prob changes -- the Transformers path alone moves by up to 3.4 nats between batch
# shapes -- so these are checked Linear by Linear on the same captured inputs, where the math is exact.
LAYER = {
    "w4a4_rtn": QuantConfig(w_bits=4, a_bits=4, w_clip=False),
    "w4a4_ffn_had": QuantConfig(w_bits=4, a_bits=4, w_clip=False, rotate_down_proj=True),
    "w4a4_quarot": QuantConfig(w_bits=4, a_bits=4, w_clip=False, rotate=True),
    "w4a4v4_quarot": QuantConfig(w_bits=4, a_bits=4, v_bits=4, w_clip=False, rotate=True),
}


@pytest.fixture(scope="module")
def fresh(_smollm2_state):
    from conftest import rebuild

    return (lambda: rebuild(_smollm2_state)), _smollm2_state[2]


@pytest.fixture(scope="module")
def engine(fresh):
    from osp_eval.vllm_backend import VllmEngine

    make, tok = fresh
    return VllmEngine(make(), tok, max_model_len=SEQLEN + 1)


@pytest.fixture(scope="module")
def ids(fresh, data_dir):
    from osp_eval.data import tokenize_text, wikitext2_text

    return tokenize_text(fresh[1], wikitext2_text("test", data_dir))[: 2 * SEQLEN]


def hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("name", list(FULL))
def test_prompt_logprobs_match_transformers(name, fresh, engine, ids):
    from osp_eval.vllm_backend import perplexity_vllm

    model = fresh[0]()
    quantize_(model, FULL[name], progress=False)
    engine.load(model)
    windows = ids.view(2, SEQLEN)
    got = engine.prompt_logprobs(windows.tolist())
    for w, lp in zip(windows, got):
        want = hf_logprobs(model, w)
        assert lp.shape == want.shape
        assert (lp - want).abs().max().item() < 1e-4, name
    hf = perplexity(model, ids, SEQLEN, batch_size=2, progress=False)
    vl = perplexity_vllm(engine, ids, SEQLEN, progress=False)
    assert vl["nwindows"] == hf["nwindows"] == 2
    assert abs(vl["ppl"] - hf["ppl"]) / hf["ppl"] < 1e-5, name


def _capture_inputs(model, ids):
    """The raw input of every decoder Linear (before its transform) on one forward pass."""
    from osp_eval.arch import get_adapter

    ad, seen, hooks = get_adapter(model), {}, []
    for i, layer in enumerate(ad.layers(model)):
        for role, lin in ad.linears(layer).items():
            def grab(mod, args, key=(i, role)):
                seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
            hooks.append(lin.register_forward_pre_hook(grab, prepend=True))  # runs before the transform
    with torch.no_grad():
        model(input_ids=ids.view(2, SEQLEN), use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", list(LAYER))
def test_quantized_linears_match_transformers(name, fresh, engine, ids):
    from osp_eval.arch import get_adapter

    model = fresh[0]()
    quantize_(model, LAYER[name], progress=False)
    engine.load(model)
    x = _capture_inputs(model, ids)
    vm = engine.llm.apply_model(lambda m: m)[0]  # in-process engine: the model object itself
    ad = get_adapter(model)

    def close(a, b):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item() + 1e-6, name

    with torch.no_grad():
        for i, (layer, vlayer) in enumerate(zip(ad.layers(model), vm.model.layers)):
            lin = ad.linears(layer)
            assert hasattr(vlayer.self_attn.qkv_proj, "osp_input") and hasattr(vlayer.mlp.down_proj, "osp_input")
            close(vlayer.self_attn.qkv_proj(x[i, "q"])[0], torch.cat([lin[r](x[i, "q"]) for r in "qkv"], -1))
            close(vlayer.self_attn.o_proj(x[i, "o"])[0], lin["o"](x[i, "o"]))
            close(vlayer.mlp.gate_up_proj(x[i, "gate"])[0],
                  torch.cat([lin["gate"](x[i, "gate"]), lin["up"](x[i, "gate"])], -1))
            close(vlayer.mlp.down_proj(x[i, "down"])[0], lin["down"](x[i, "down"]))
    # The whole model runs through vLLM with these hooks (values: see LAYER's comment).
    lp = engine.prompt_logprobs(ids.view(2, SEQLEN).tolist())
    assert all(torch.isfinite(t).all() for t in lp)


# K-cache quantization: K is rotated and rounded per token and head in a pre-hook on vLLM's Attention. Whole-model
# parity holds where fp32 noise flips no rounding: with V4, or K4 on the rotated W16 model, the Transformers path in
# fp32 vs fp64 already differs by 0.28 / 0.47 nats on these windows (V4 is checked per Linear in LAYER).
KV = {
    "k4": QuantConfig(k_bits=4),
    "w4_k4_quarot": QuantConfig(w_bits=4, w_clip=False, k_bits=4, rotate=True),
}


def test_k_hook_is_kspec_per_head(fresh):
    """The vLLM-layout hook ([tokens, heads*head_dim]) against KSpec on the Transformers layout
    ([batch, heads, tokens, head_dim]): same q and k, element for element."""
    from osp_eval.runtime import ActSpec, KSpec
    from osp_eval.vllm_backend import _set_k_hook

    torch.manual_seed(0)
    t, hq, hk, d = 5, 6, 2, 64
    q, k, v = torch.randn(t, hq * d), torch.randn(t, hk * d) * 3, torch.randn(t, hk * d)
    seen = {}
    attn = torch.nn.Module()
    attn.forward = lambda q, k, v: seen.update(q=q, k=k, v=v)
    kspec = KSpec(ActSpec(4, False, 1.0, d, True))
    _set_k_hook(attn, kspec, d)
    attn(q, k, v)
    want_q, want_k = kspec(q.view(1, t, hq, d).transpose(1, 2), k.view(1, t, hk, d).transpose(1, 2))
    # The two layouts reach the Hadamard matmul with different strides: BLAS may round the last bit
    # differently (it does on some CPUs), so equal within float rounding, and K on the same 4-bit grid.
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["q"], want_q.transpose(1, 2).reshape(t, hq * d), **close)
    torch.testing.assert_close(seen["k"], want_k.transpose(1, 2).reshape(t, hk * d), **close)
    assert torch.equal(seen["v"], v) and not torch.equal(seen["k"], k)
    _set_k_hook(attn, None, d)  # a later push without K quant removes the hook
    attn(q, k, v)
    assert torch.equal(seen["k"], k)


@pytest.mark.parametrize("name", list(KV))
def test_kv_quant_matches_transformers(name, fresh, engine, ids):
    """Whole model through vLLM with K-cache quantization against the Transformers path (a looser tolerance than
    FULL's: a K rounding may still flip on fp32 noise); without the hook the log-probs are far off."""
    model = fresh[0]()
    quantize_(model, KV[name], progress=False)
    engine.load(model)
    windows = ids.view(2, SEQLEN)
    got = engine.prompt_logprobs(windows.tolist())
    worst = max((lp - hf_logprobs(model, w)).abs().max().item() for w, lp in zip(windows, got))
    assert worst < 2e-3, (name, worst)
    # The same push without the K hook (vLLM's plain attention) is far off: the hook is what matched.
    vm = engine.llm.apply_model(lambda m: m)[0]
    for layer in vm.model.layers:
        layer.self_attn.attn.osp_k_hook.remove()
        del layer.self_attn.attn.osp_k_hook, layer.self_attn.attn.osp_k
    plain = engine.prompt_logprobs(windows.tolist())
    off = max((lp - hf_logprobs(model, w)).abs().max().item() for w, lp in zip(windows, plain))
    assert off > 20 * max(worst, 1e-4), (name, worst, off)


def test_spinquant_rotations_match_transformers(fresh, engine, ids, tmp_path):
    """Learned (here: random orthogonal, not Hadamard) R1/R2 from an R.bin go through vLLM like QuaRot's."""
    from osp_eval.arch import get_adapter

    model = fresh[0]()
    dims = get_adapter(model).dims(model)
    g = torch.Generator().manual_seed(0)

    def orth(n):
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()

    rots = {"R1": orth(dims.hidden)}
    rots.update({f"model.layers.{i}.self_attn.R2": orth(dims.head_dim) for i in range(dims.num_layers)})
    torch.save(rots, tmp_path / "R.bin")
    quantize_(model, QuantConfig(w_bits=4, w_clip=False, rotate=True, optimized_rotation_path=str(tmp_path / "R.bin")),
              progress=False)
    engine.load(model)
    windows = ids.view(2, SEQLEN)
    for w, lp in zip(windows, engine.prompt_logprobs(windows.tolist())):
        # Dense rotations round differently from Hadamards in fp32: 1e-5 typical, one position at 2.6e-4.
        assert (lp - hf_logprobs(model, w)).abs().max().item() < 1e-3


def test_rejected_head_size(stories):
    from osp_eval.vllm_backend import VllmEngine

    model, tok = stories
    with pytest.raises(OspEvalError, match="head_dim 8"):
        VllmEngine(model, tok, max_model_len=SEQLEN + 1)


def test_cli_ppl_backend_vllm_matches_hf(smollm2_path, data_dir, tmp_path, engine):
    """End to end: `osp-eval ppl --backend vllm` gives the hf backend's PPL (a second in-process engine)."""
    import json

    from osp_eval.cli import main

    common = [smollm2_path, "--w_bits", "4", "--w_method", "rtn", "--no-w_clip", "--rotate_down_proj",
              "--seqlen", str(SEQLEN), "--max_windows", "2", "--data_dir", data_dir, "--output_dir", str(tmp_path), "--no_progress"]
    assert main(["ppl", *common]) == 0
    assert main(["ppl", *common, "--backend", "vllm"]) == 0
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "ppl").rglob("*.json"))]
    assert sorted(r["backend"] for r in recs) == ["hf", "vllm"]  # two cells: the backend is in the hash
    assert abs(recs[0]["ppl"] - recs[1]["ppl"]) / recs[0]["ppl"] < 1e-5


def _details(record, task):
    import glob

    import pandas as pd

    files = glob.glob(f"{record['lighteval_output']}/details/*/*/details_{task}|*.parquet")
    assert len(files) == 1, files
    return pd.read_parquet(files[0])


def _both_backends(smollm2_path, data_dir, tmp_path, monkeypatch, hook: str, task: str, n: int, **kw):
    """One lighteval run per backend (W4 RTN + FFN Had), counting calls of vllm_backend.`hook`; returns the
    per-sample details of `task` for (hf, vllm)."""
    import osp_eval.vllm_backend as vb
    from osp_eval.lighteval_run import run_lighteval

    calls, real = [], getattr(vb, hook)
    monkeypatch.setattr(vb, hook, lambda *a: calls.append(1) or real(*a))
    cfg = QuantConfig(w_bits=4, w_method="rtn", w_clip=False, rotate_down_proj=True)
    runs = {b: run_lighteval(smollm2_path, cfg, tasks=task, data_dir=data_dir, max_samples=n, batch_size=4,
                             output_dir=str(tmp_path / b), save_details=True, progress=False, backend=b,
                             **({"loglik_backend": "vllm"} if b == "vllm" else {}), **kw)
            for b in ("hf", "vllm")}
    assert runs["vllm"]["backend"] == "vllm" and calls  # the vLLM run really went through vLLM
    name = task.split("|")[0]
    assert runs["hf"]["tasks"][name]["value"] == runs["vllm"]["tasks"][name]["value"]
    hf, vl = _details(runs["hf"], name), _details(runs["vllm"], name)
    assert len(hf) == len(vl) == n
    return zip(hf["model_response"], vl["model_response"])


def test_lighteval_loglikelihoods_match_transformers(smollm2_path, data_dir, tmp_path, monkeypatch):
    """lighteval_ptq_vllm.py's path: per-choice log-likelihoods and greedy flags equal the Transformers path's."""
    for a, b in _both_backends(smollm2_path, data_dir, tmp_path, monkeypatch, "score_rows_vllm", "arc:easy|0", 2,
                               max_length=256):
        assert list(a["input_tokens"]) == list(b["input_tokens"])
        assert len(a["logprobs"]) == len(b["logprobs"]) >= 2
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert abs(x - y) < 1e-4
        assert list(a["argmax_logits_eq_gold"]) == list(b["argmax_logits_eq_gold"])


def test_lighteval_generation_matches_transformers(smollm2_path, data_dir, tmp_path, monkeypatch):
    """Generative tasks through vLLM (lighteval_ptq_vllm.py): the same greedy texts as lighteval's HF loop."""
    texts = []
    for a, b in _both_backends(smollm2_path, data_dir, tmp_path, monkeypatch, "generate_vllm", "trivia_qa|5", 3,
                               max_length=512):
        pad = int(a["padded_tokens_count"])  # the HF loop returns its left-padded batch row
        assert list(a["input_tokens"])[pad:] == list(b["input_tokens"])
        assert list(a["text"]) == list(b["text"])
        texts += list(a["text"])
    assert any(t.strip() for t in texts)  # something was generated: empty == empty would prove nothing


def test_lighteval_loglik_backend_hf_keeps_scoring_in_transformers(smollm2_path, data_dir, tmp_path, monkeypatch):
    """--backend vllm --loglik_backend hf: the engine generates, the Transformers model scores (no vLLM scoring)."""
    import osp_eval.vllm_backend as vb
    from osp_eval.lighteval_run import run_lighteval

    calls = []
    monkeypatch.setattr(vb, "score_rows_vllm", lambda *a: calls.append(1))
    cfg = QuantConfig(w_bits=4, w_method="rtn", w_clip=False)
    kw = dict(tasks="arc:easy|0", data_dir=data_dir, max_samples=2, batch_size=4, max_length=256, progress=False)
    hf = run_lighteval(smollm2_path, cfg, output_dir=str(tmp_path / "hf"), **kw)
    mixed = run_lighteval(smollm2_path, cfg, output_dir=str(tmp_path / "mixed"), backend="vllm", loglik_backend="hf",
                          **kw)
    assert not calls
    assert mixed["backends"] == {"loglikelihood": "hf", "generation": "vllm"}
    assert mixed["tasks"]["arc:easy"]["value"] == hf["tasks"]["arc:easy"]["value"]



# New families, each in an engine of its own (so after the tests of the shared engine): a tiny random model with
# head_dim 64 (vLLM's CPU attention sizes), random norm gains, W4 QuaRot with RTN weights, against Transformers.
# Weight-only, as FULL above: activation rounding turns fp32 GEMM noise into O(1e-3) differences (5.7e-3 seen for
# Qwen3 at A4KV4); the activation/K/V hooks are the same code for every family and are checked per Linear above.
FAMILY_CONFIGS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=6.0, residual_multiplier=0.3,
                                                             attention_multiplier=0.1, logits_scaling=4.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),  # split qkv/gate_up, fused again by vLLM
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(  # post-norms: R1ᵀ·diag(gain)·R1 hooks in vLLM
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=64)),
}


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_new_family_matches_transformers_in_vllm(family, stories_path):
    import transformers

    from osp_eval.models import load_tokenizer
    from osp_eval.vllm_backend import VllmEngine

    config_cls, model_cls, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, config_cls)(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False, **extra)
    config.architectures = [model_cls]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float().eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family == "gemma3" else 1.0))
    quantize_(model, QuantConfig(w_bits=4, w_clip=False, rotate=True), progress=False)
    engine = VllmEngine(model, load_tokenizer(stories_path), max_model_len=SEQLEN + 1)
    ids = torch.randint(0, 512, (SEQLEN,), generator=torch.Generator().manual_seed(1))
    got = engine.prompt_logprobs([ids.tolist()])[0]
    assert (got - hf_logprobs(model, ids)).abs().max().item() < 1e-4, family


# Mixture of experts, each family in an engine of its own: vLLM's fused MoE kernel is replaced by the expert loop
# (vllm_backend.ExpertLoop). The 16-bit model checks routing and the expert weights' layout against Transformers;
# W4A4KV4 QuaRot (GPTQ) the per-expert activation quant and down_proj Hadamard, which are then removed to show
# that they are what matched. A4 holds here to ~2e-6 (no rounding flips on this tiny model, unlike SmolLM2).
MOE_CONFIGS = {
    # layer 1 dense (mlp_only_layers): both MLP kinds in one engine
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=64, num_experts=4,
                                                                 norm_topk_prob=True, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    # vLLM's own OLMoE block never renormalizes the top-k weights; the loop follows the config, as Transformers
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, norm_topk_prob=True)),
}


@pytest.mark.parametrize("family", list(MOE_CONFIGS))
def test_moe_family_matches_transformers_in_vllm(family, stories_path):
    import transformers

    from osp_eval.arch import get_adapter
    from osp_eval.models import load_tokenizer
    from osp_eval.vllm_backend import ExpertLoop, VllmEngine

    config_cls, model_cls, extra = MOE_CONFIGS[family]
    config = getattr(transformers, config_cls)(
        vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=False, **extra)
    config.architectures = [model_cls]

    def build():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).float().eval().requires_grad_(False)
        with torch.no_grad():
            for name, p in model.named_parameters():  # experts are created empty: every weight gets a value
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.1)
        return get_adapter(model).prepare(model)

    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 512, (2, SEQLEN), generator=gen)

    def worst(model, engine):
        return max((lp - hf_logprobs(model, w)).abs().max().item()
                   for w, lp in zip(windows, engine.prompt_logprobs(windows.tolist())))

    model = build()
    engine = VllmEngine(model, load_tokenizer(stories_path), max_model_len=SEQLEN + 1)
    assert worst(model, engine) < 1e-4, family  # 16 bits
    model = build()
    cfg = QuantConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq", w_clip=False, rotate=True,
                      nsamples=4, calib_seqlen=SEQLEN)
    quantize_(model, cfg, torch.randint(0, 512, (4, SEQLEN), generator=gen), progress=False)
    engine.load(model)
    quant = worst(model, engine)
    assert quant < 1e-4, (family, quant)
    vm = engine.llm.apply_model(lambda m: m)[0]
    loops = [getattr(layer, get_adapter(model).vllm_mlp).forward for layer in vm.model.layers]
    assert sum(isinstance(f, ExpertLoop) for f in loops) == (1 if family == "qwen3_moe" else 2)
    for f in loops:
        if isinstance(f, ExpertLoop):
            assert f.down is not None
            f.down = None  # no online Hadamard, no activation quant on the experts' down_proj inputs
    off = worst(model, engine)
    assert off > 100 * max(quant, 1e-4), (family, quant, off)
