"""Every supported family, on a tiny random model built from its transformers config class (no hub):
16-bit rotation is exact, 4-bit methods run, K is quantized after RoPE, SpinQuant trains."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from osp_eval import preset, quantize_
from osp_eval.arch import get_adapter
from osp_eval.ppl import perplexity

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),  # heads·head_dim != hidden, as Qwen3
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, pad_token_id=0, partial_rotary_factor=0.75)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(tie_word_embeddings=False)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.1, logits_scaling=4.0)),
}


def build(family: str, dtype=torch.float64, seed: int = 0):
    """A random model of the family, with random norm gains (ones would hide a wrongly folded gain)."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(seed)
    impl = get_adapter_for(model_cls).attn_implementation
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    model.set_attn_implementation(impl)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in family else 1.0))
            elif "bias" in name:
                p.copy_(torch.randn_like(p) * 0.02)
    return model.requires_grad_(False)


def get_adapter_for(arch: str):
    from osp_eval.arch import adapter_for_architecture

    return adapter_for_architecture(arch)


def ids(n=2, t=48, seed=1):
    return torch.randint(0, TINY["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rotated_16bit_model_gives_the_original_logits(family):
    x = ids()
    model = build(family)
    with torch.no_grad():
        want = model(input_ids=x).logits
    quantize_(model, preset("osp", rotate=True, center_embeddings=False, w_method="rtn"), progress=False)
    with torch.no_grad():
        got = model(input_ids=x).logits
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-6, (family, err)
    # a wrongly handled norm gain is far from that: the check can fail
    ad = get_adapter(model)
    norm = ad.norms(ad.layers(model)[0])[0] or ad.out_norms(ad.layers(model)[0])[0]
    with torch.no_grad():
        norm.weight.add_(0.5)
        assert ((model(input_ids=x).logits - want).norm() / want.norm()).item() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["rtn", "gptq", "quarot"])
def test_4bit_methods_run_with_finite_ppl(family, method):
    model = build(family, torch.float32)
    text = ids(1, 4 * 32, seed=2)[0]
    base = perplexity(model, text, seqlen=32, progress=False)["ppl"]
    over = dict(rtn=dict(w_method="rtn"), gptq=dict(w_method="gptq", rotate_down_proj=True),
                quarot=dict(w_method="gptq", rotate=True))[method]
    cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, nsamples=4, calib_seqlen=32, **over)
    quantize_(model, cfg, ids(4, 32, seed=3) if cfg.w_method == "gptq" else None, progress=False)
    ppl = perplexity(model, text, seqlen=32, progress=False)["ppl"]
    assert math.isfinite(ppl) and ppl > 1 and ppl != base, (family, method, base, ppl)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_k_is_quantized_after_rope_per_head(family, monkeypatch):
    """The key that KSpec quantizes is the post-RoPE key: per head it has the norm of the pre-RoPE key (RoPE
    rotates pairs of dims), equals it at position 0 and differs later; after quantization each (token, head)
    row has at most 2^bits distinct values."""
    from osp_eval import runtime

    model = build(family, torch.float64)
    quantize_(model, preset("osp", k_bits=4, w_method="rtn"), progress=False)
    ad = get_adapter(model)
    attn = ad.attention(ad.layers(model)[1])
    d = ad.dims(model).head_dim
    seen = {}
    pre = getattr(attn, "k_norm", None) or ad.linears(ad.layers(model)[1])["k"]
    h = pre.register_forward_hook(lambda m, a, out: seen.__setitem__("pre", out))
    call = runtime.KSpec.__call__

    def spy(self, q, k):
        if self is attn.osp_k:
            seen["key"] = k
            q2, k2 = call(self, q, k)
            seen["quant"] = k2
            return q2, k2
        return call(self, q, k)

    monkeypatch.setattr(runtime.KSpec, "__call__", spy)
    with torch.no_grad():
        model(input_ids=ids(1, 16))
    h.remove()
    key = seen["key"]
    b, kv, t, _ = key.shape
    pre = seen["pre"]  # [b, t, kv·d] or [b, t, kv, d]; Gemma 3 norms after the transpose: [b, kv, t, d]
    pre_k = pre if pre.shape == key.shape else pre.reshape(b, t, -1, d).transpose(1, 2)
    # cos/sin come from float32 inv_freq: cos²+sin² = 1 to ~1e-8
    torch.testing.assert_close(key.norm(dim=-1), pre_k.norm(dim=-1), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(key[:, :, 0], pre_k[:, :, 0])  # RoPE at position 0 is the identity
    assert not torch.allclose(key[:, :, 5], pre_k[:, :, 5])
    assert max(len(torch.unique(r)) for r in seen["quant"].reshape(-1, d)) <= 16


@pytest.mark.parametrize("family", ["olmo2", "gemma3", "phi3", "qwen3"])
def test_spinquant_training_runs_and_keeps_16bit_function(family):
    """R1/R2 training on post-norm and fused families: a step changes the rotations; the trained rotations,
    evaluated through --rotate at 16 bits, still give the original logits."""
    from osp_eval.spinquant import prepare_training_model, save_rotations, train_rotations

    x = ids(2, 32, seed=4)
    model = build(family, torch.float64)
    with torch.no_grad():
        want = model(input_ids=x).logits
    cfg = preset("osp", a_bits=4, k_bits=4, v_bits=4, w_method="gptq", center_embeddings=False)
    rot = prepare_training_model(model, cfg)
    r1 = rot.r1.detach().clone()
    train_rotations(model, rot, x, steps=2, lr=1.5, batch_size=2, progress=False)
    assert not torch.allclose(rot.r1.detach(), r1)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = save_rotations(f"{d}/R.bin", rot.state())
        fresh = build(family, torch.float64)
        quantize_(fresh, preset("osp", rotate=True, center_embeddings=False, w_method="rtn",
                                optimized_rotation_path=str(path)), progress=False)
        with torch.no_grad():
            got = fresh(input_ids=x).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_phi3_split_projections_are_exact():
    model = build("phi3")
    x = ids()
    with torch.no_grad():
        fused_qkv = model.model.layers[0].self_attn.qkv_proj.weight.clone()
        want = model(input_ids=x).logits
    get_adapter(model).prepare(model)
    lin = get_adapter(model).linears(model.model.layers[0])
    assert torch.equal(torch.cat([lin["q"].weight, lin["k"].weight, lin["v"].weight]), fused_qkv)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)


def test_unsupported_architecture_names_the_families():
    from osp_eval.arch import adapter_for_architecture
    from osp_eval.errors import OspEvalError

    for arch in ("DeepseekV3ForCausalLM", "LlavaForConditionalGeneration"):
        with pytest.raises(OspEvalError) as e:
            adapter_for_architecture(arch)
        msg = str(e.value)
        assert "\n" not in msg and arch in msg and "gemma3" in msg and "olmo2" in msg
