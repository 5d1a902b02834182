"""GGUF config fixes: what transformers' GGUF loader (5.19) drops from a file's metadata, put back on the config
before the weights load, so a GGUF checkpoint computes the same function as its safetensors original.

transformers builds GGUF configs from a per-architecture key table (integrations/ggml.py) that misses keys some
of our families need: Qwen3's head_dim, Qwen3-MoE's expert width, Gemma's soft-capping and query scale, Phi-3's
partial RoPE and sliding window, and every RoPE scaling (llama.cpp's `rope.scaling.*` keys and Llama 3's
`rope_freqs` tensor). Which keys matter is adapter data (arch.DecoderAdapter.gguf_*); what cannot be put back is
a one-line OspEvalError."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import OspEvalError

CONVERT = "convert it to a safetensors folder (the original Hugging Face checkpoint) and load that"
# Llama 3.x rope scaling constants shared by every Meta release (3.1, 3.2, 3.3); only the factor differs.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class GgufMeta:
    """A GGUF file's metadata (scalars and strings; arrays as their length) and tensor names, read memory-mapped;
    `rope_freqs` is Llama 3's per-frequency divisor tensor when the file has one."""

    arch: str
    name: str
    kv: dict
    tensors: frozenset
    rope_freqs: np.ndarray | None = None

    def get(self, key: str, default=None):
        return self.kv.get(f"{self.arch}.{key}", default)


def read_meta(path: str) -> GgufMeta:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as e:
        raise OspEvalError(f"cannot read the GGUF header of {path} ({type(e).__name__}: {e})") from e
    kv = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1:  # a scalar or a string; arrays (the vocabulary) are not config
            kv[key] = field.contents()
        else:
            kv[key] = len(field.data)
    tensors = {t.name: t for t in reader.tensors}
    rope = tensors.get("rope_freqs.weight")
    arch = kv.get("general.architecture")
    if not arch:
        raise OspEvalError(f"{path} has no general.architecture: not a model GGUF")
    return GgufMeta(arch, str(kv.get("general.name", "")), kv, frozenset(tensors),
                    None if rope is None else np.array(rope.data, dtype=np.float64).reshape(-1))


def check_arch(meta: GgufMeta, adapters) -> None:
    """Refuse, before transformers reads the file, what it cannot load as one of our families."""
    known = sorted({ad.gguf_arch for ad in adapters if ad.gguf_arch})
    if meta.arch not in known:
        raise OspEvalError(f"GGUF architecture {meta.arch!r} cannot be loaded by transformers' GGUF loader as one "
                           f"of osp-eval's families (GGUF works for {', '.join(known)}): {CONVERT}")


def llama3_divisors(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, inv_freq):
    """Llama 3 rope scaling as per-frequency divisors of the base inverse frequencies (what llama.cpp stores as
    `rope_freqs`): 1 for short wavelengths, `factor` for long ones, a smooth blend between."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blend = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0,
                    np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, blend))


def _rope_scaling(meta: GgufMeta, rope_dim: int, theta: float) -> dict | None:
    """The rope_parameters entries that reproduce the file's RoPE scaling (None: unscaled)."""
    kind = meta.get("rope.scaling.type", "none")
    if meta.rope_freqs is not None:
        inv_freq = 1.0 / theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
        factor = float(meta.rope_freqs.max())
        want = llama3_divisors(factor, inv_freq=inv_freq, **LLAMA3_ROPE)
        if len(meta.rope_freqs) != len(inv_freq) or not np.allclose(meta.rope_freqs, want, rtol=1e-5, atol=0):
            raise OspEvalError(f"GGUF {meta.name or meta.arch}: its rope_freqs tensor is not Llama 3 rope scaling "
                               f"(factor {factor:g}, low/high freq factor 1/4, original context 8192), which "
                               f"transformers cannot reproduce: {CONVERT}")
        return {"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE}
    if any(t.startswith("rope_factors_") for t in meta.tensors):
        raise OspEvalError(f"GGUF {meta.name or meta.arch}: LongRoPE (rope_factors_long/short tensors) is dropped "
                           f"by transformers' GGUF loader: {CONVERT}")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.get("rope.scaling.factor"))}
    if kind not in ("none", ""):
        raise OspEvalError(f"GGUF {meta.name or meta.arch}: {kind} rope scaling is dropped by transformers' GGUF "
                           f"loader: {CONVERT}")
    return None


def config_fixes(meta: GgufMeta, config, adapter) -> dict:
    """{config attribute: value} that transformers' GGUF config lacks for this file. Raises OspEvalError for
    files that transformers loads as a different model (experts dropped, scaling it cannot express)."""
    where = f"GGUF {meta.name or meta.arch}"
    if meta.get("expert_count", 0) and not adapter.experts:
        raise OspEvalError(f"{where}: a mixture of experts under llama.cpp architecture {meta.arch!r} (Mixtral); "
                           f"transformers loads it as a dense {adapter.family} without its experts: {CONVERT}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    fixes = {}
    for key, attr in adapter.gguf_keys:
        value = meta.get(key)
        if value is not None and (head_dim if attr == "head_dim" else getattr(config, attr, None)) != value:
            fixes[attr] = value
    head_dim = fixes.get("head_dim", head_dim)
    if adapter.gguf_qscale_layers:  # Gemma: the file has no query_pre_attn_scalar; llama.cpp's rule
        big = config.num_hidden_layers in adapter.gguf_qscale_layers
        scalar = config.hidden_size // heads if big else head_dim
        if config.query_pre_attn_scalar != scalar:
            fixes["query_pre_attn_scalar"] = scalar

    rope = dict(config.rope_parameters)
    per_layer_type = "full_attention" in rope  # Gemma 3: one entry per layer type; scaling is global-only
    base = rope["full_attention"] if per_layer_type else rope
    new = dict(base)
    rope_dim = meta.get("rope.dimension_count") or head_dim
    if rope_dim != head_dim:
        if not adapter.gguf_partial_rope:
            raise OspEvalError(f"{where}: RoPE on {rope_dim} of {head_dim} head dimensions, which "
                               f"{adapter.family} cannot express: {CONVERT}")
        new["partial_rotary_factor"] = rope_dim / head_dim
    elif "partial_rotary_factor" in new and new["partial_rotary_factor"] != 1.0:
        new["partial_rotary_factor"] = 1.0
    new |= _rope_scaling(meta, rope_dim, base.get("rope_theta", 10000.0)) or {}
    if new != base:
        fixes["rope_parameters"] = {**rope, "full_attention": new} if per_layer_type else new
    return fixes


def apply_fixes(config, fixes: dict):
    for attr, value in fixes.items():
        setattr(config, attr, value)
    return config
