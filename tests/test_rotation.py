"""Computational invariance: with quantization off, rotated models compute the same logits (float64)."""

import pytest
import torch

from osp_eval import preset, quantize_
from osp_eval.apply import install_kv_quant
from osp_eval.errors import OspEvalError
from osp_eval.runtime import ActSpec, KSpec

TOL = 1e-9


@pytest.fixture(autouse=True)
def float64_rmsnorm(monkeypatch):
    """transformers' RMSNorms compute in fp32 whatever the input dtype; in float64 they would not hide a
    1e-7 error, so compute them in the input's dtype here to make the invariance check strict."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    for mod, name in ((modeling_llama, "LlamaRMSNorm"), (modeling_mistral, "MistralRMSNorm"),
                      (modeling_qwen2, "Qwen2RMSNorm")):
        monkeypatch.setattr(getattr(mod, name), "forward", forward)


def _tiny(arch: str, tied: bool):
    """A random tiny model of another family: Qwen2 (q/k/v biases) or Mistral, GQA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=128, tie_word_embeddings=tied)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():  # non-trivial norms and biases so that wrong fusions show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return m.requires_grad_(False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check(model, cfg, ids, tol=TOL):
    ref = _logits(model, ids)
    quantize_(model, cfg, progress=False)
    out = _logits(model, ids)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, err
    return model


CFGS = {
    "rotate": dict(rotate=True, center_embeddings=False),
    "rotate_down_proj": dict(rotate_down_proj=True),
    "quarot_o_hadamard": dict(rotate=True, center_embeddings=False, o_proj_input="hadamard"),
}


@pytest.mark.parametrize("mode", list(CFGS))
def test_stories_invariance(stories, mode):
    model = stories[0].double()
    ids = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    _check(model, preset("osp", **CFGS[mode]), ids)


@pytest.mark.parametrize("mode", ["rotate", "rotate_down_proj"])
def test_smollm2_invariance(smollm2, mode):
    model = smollm2[0].double()
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(1))
    m = _check(model, preset("osp", **CFGS[mode]), ids)
    if mode == "rotate":  # tied embeddings were untied, and the massive activation channel is gone
        assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
@pytest.mark.parametrize("tied", [True, False])
def test_other_families_invariance(arch, tied):
    model = _tiny(arch, tied)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    _check(model, preset("osp", **CFGS["rotate"]), ids)


def test_untied_stories_invariance(stories):
    model = stories[0].double()
    from osp_eval.rotation import untie_lm_head

    untie_lm_head(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(3))
    _check(model, preset("osp", **CFGS["rotate"]), ids)


def test_qk_hadamard_is_invariant_at_16_bits(stories):
    """R3 alone (Q and K rotated after RoPE, K 'quantized' at 16 bits) leaves attention scores unchanged."""
    model = stories[0].double()
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, ids)
    install_kv_quant(model, preset("osp", k_bits=4))  # installs the attention function
    for layer in model.model.layers:
        layer.self_attn.osp_k = KSpec(ActSpec(16))
    assert (( _logits(model, ids) - ref).abs().max() / ref.abs().max()).item() < TOL


def test_centring_changes_rmsnorm_models(stories):
    """Embedding mean-centring (reference parity) is NOT function-preserving for RMSNorm models."""
    model = stories[0].double()
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(5))
    ref = _logits(model, ids)
    quantize_(model, preset("osp", rotate=True, center_embeddings=True), progress=False)
    assert ((_logits(model, ids) - ref).abs().max() / ref.abs().max()).item() > 1e-4


def test_rotation_is_seeded(stories_factory):
    a, b = stories_factory()[0], stories_factory()[0]
    for m in (a, b):
        quantize_(m, preset("osp", rotate=True), progress=False)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    c = stories_factory()[0]
    quantize_(c, preset("osp", rotate=True, rotation_seed=1), progress=False)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)


def test_bad_rotation_file(stories, tmp_path):
    p = tmp_path / "R.bin"
    torch.save({"R1": torch.eye(32)}, p)
    with pytest.raises(OspEvalError, match="R1 has shape"):
        quantize_(stories[0], preset("osp", rotate=True, optimized_rotation_path=str(p)), progress=False)


def test_loaded_rotation_file_is_used_and_invariant(stories, tmp_path):
    from osp_eval.hadamard import random_hadamard_matrix

    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    d = {"R1": q}
    for i in range(5):
        d[f"model.layers.{i}.self_attn.R2"] = random_hadamard_matrix(8, i)
    torch.save(d, tmp_path / "R.bin")
    model = stories[0].double()
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(7))
    _check(model, preset("osp", rotate=True, center_embeddings=False, optimized_rotation_path=str(tmp_path / "R.bin")),
           ids)


def test_size_without_hadamard_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=92, num_hidden_layers=1, num_attention_heads=4,
                      vocab_size=64)
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(OspEvalError, match="no Hadamard construction for intermediate"):
        quantize_(model, preset("osp", rotate_down_proj=True), progress=False)
    with pytest.raises(OspEvalError, match="num_heads"):  # QuaRot-paper o_proj mode needs H of size heads
        quantize_(LlamaForCausalLM(cfg.__class__(**{**cfg.to_dict(), "num_attention_heads": 10,
                                                     "num_key_value_heads": 10, "intermediate_size": 96,
                                                     "hidden_size": 80})).eval(),
                  preset("quarot_paper", rotate=True, w_method="rtn"), progress=False)
