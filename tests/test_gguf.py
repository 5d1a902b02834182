"""GGUF loading per family: tiny random models written as llama.cpp lays them out (tests/gguf_writer.py), loaded
back through transformers' GGUF loader plus osp_eval.gguf's config fixes, must compute the original's logits;
transformers alone must not (the fixes matter); what cannot be loaded is a one-line error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gguf_writer import llama3_rope_freqs, write_gguf
from osp_eval.arch import get_adapter
from osp_eval.errors import OspEvalError
from osp_eval.models import load_model

BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
# family -> (model_type, config overrides, llama.cpp arch, writer options, extra metadata)
SPECS = {
    "llama": ("llama", dict(head_dim=16), "llama", dict(permute_qk=True), {}),
    "llama_linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}),
                          "llama", dict(permute_qk=True), {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}),
    "llama3_rope": ("llama", dict(rope_parameters=LLAMA3, head_dim=16), "llama", dict(permute_qk=True), {}),
    # llama.cpp writes Mistral as a Llama (no sliding window key: only 7B v0.1 had one)
    "mistral": ("mistral", dict(sliding_window=None), "llama", dict(permute_qk=True, name="Mistral 7B"), {}),
    "qwen2": ("qwen2", {}, "qwen2", {}, {}),
    "qwen3": ("qwen3", dict(head_dim=16), "qwen3", {}, {}),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                    norm_topk_prob=True), "qwen3moe", {},
                  {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 24}),
    "phi3": ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                          sliding_window=8), "phi3", {}, {"attention.sliding_window": 8}),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, sliding_window=8, tie_word_embeddings=True),
               "gemma2", dict(norm_plus_one=True),
               {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "attention.sliding_window": 8}),
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=6,
                                   tie_word_embeddings=True, rope_parameters={
                                       "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               "gemma3", dict(norm_plus_one=True),
               {"attention.sliding_window": 8, "rope.scaling.type": "linear", "rope.scaling.factor": 4.0}),
}
# what transformers' GGUF loader drops for each, and osp-eval puts back
FIXES = {"llama_linear_rope": {"rope_parameters"}, "llama3_rope": {"rope_parameters"}, "qwen3": {"head_dim"},
         "qwen3_moe": {"moe_intermediate_size"}, "phi3": {"rope_parameters", "sliding_window"},
         "gemma2": {"attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"},
         "gemma3": {"query_pre_attn_scalar", "rope_parameters"}}


def tiny(model_type, **over):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**BASE, **over})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for p in model.parameters():  # norms and routers away from their init, so a dropped offset shows
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def written(tmp_path, family, kv=None, tensors=None):
    model_type, over, arch, opts, meta = SPECS[family]
    model = tiny(model_type, **over)
    extra = {"rope_freqs.weight": llama3_rope_freqs(model.config)} if family == "llama3_rope" else {}
    path = write_gguf(model, tmp_path / f"{family}.gguf", arch, kv={**meta, **(kv or {})},
                      extra_tensors={**extra, **(tensors or {})}, **opts)
    return model, path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(3, 64, (1, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", SPECS)
def test_gguf_logits_match_original(tmp_path, family):
    model, path = written(tmp_path, family)
    loaded, tok = load_model(path, dtype="float32", device="cpu")
    assert type(loaded).__name__ == ("LlamaForCausalLM" if family == "mistral" else type(model).__name__)
    assert set(loaded.osp_source["gguf_config"]) == FIXES.get(family, set())
    assert get_adapter(loaded).dims(loaded) == get_adapter(model).dims(model)  # what rotations are sized by
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FIXES)
def test_transformers_alone_computes_another_function(tmp_path, family):
    """The fixes matter: without them the same file fails to run, gives other logits, or (Qwen3-MoE: the
    experts' weights carry their own width) gives osp-eval wrong dimensions for its rotations."""
    model, path = written(tmp_path, family)
    adapter = get_adapter(model)
    try:
        raw = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.split("/")[-1],
                                                   dtype=torch.float32, attn_implementation="eager").eval()
        diff = (logits(raw, IDS) - logits(model, IDS)).abs().max()
    except Exception:  # shapes that do not fit the dropped config (head_dim)
        return
    assert diff > 1e-3 or adapter.config_dims(raw.config) != adapter.config_dims(model.config)


def test_pipeline_records_fixes(tmp_path):
    from osp_eval.config import QuantConfig
    from osp_eval.pipeline import load_and_quantize

    _, path = written(tmp_path, "gemma2")
    _, _, info = load_and_quantize(path, QuantConfig(), dtype="float32", device="cpu", progress=False)
    assert info["gguf_config"] == {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                                   "query_pre_attn_scalar": 16}


def refused(path, *words):
    with pytest.raises(OspEvalError) as e:
        load_model(path, dtype="float32", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "safetensors" in msg and all(w in msg for w in words), msg


def test_refuses_family_transformers_cannot_load(tmp_path):
    model = tiny("olmo2")
    refused(write_gguf(model, tmp_path / "olmo2.gguf", "olmo2"), "'olmo2'")


def test_refuses_mixtral_as_llama(tmp_path):
    _, path = written(tmp_path, "llama", kv={"expert_count": 4, "expert_used_count": 2})
    refused(path, "Mixtral", "experts")


def test_refuses_rope_we_cannot_reproduce(tmp_path):
    _, path = written(tmp_path, "llama", kv={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})
    refused(path, "yarn")
    model = tiny("llama", head_dim=16, rope_parameters={**LLAMA3, "low_freq_factor": 2.0})
    path = write_gguf(model, tmp_path / "l3.gguf", "llama", permute_qk=True,
                      extra_tensors={"rope_freqs.weight": llama3_rope_freqs(model.config)})
    refused(path, "rope_freqs")
    _, path = written(tmp_path, "phi3", tensors={"rope_factors_long.weight": torch.ones(4).numpy()})
    refused(path, "LongRoPE")
