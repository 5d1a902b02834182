"""Write a tiny transformers model as a float32 GGUF the way llama.cpp's convert_hf_to_gguf.py lays it out
(metadata keys, tensor names from gguf-py's name map, llama's q/k row permutation, Gemma's norms stored as 1 + w,
stacked experts as ffn_{gate,up,down}_exps, Llama 3's rope_freqs), so tests can load it back through
transformers' GGUF loader. Test-only: no quantization, a byte-level toy tokenizer."""

from __future__ import annotations

import math

import numpy as np
import torch


def _arch_enum(arch: str):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for llama: the two rotary halves of each head interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(config) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for a llama3 rope_parameters: the per-frequency divisor."""
    rp = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    old, lo, hi, f = (rp["original_max_position_embeddings"], rp["low_freq_factor"], rp["high_freq_factor"],
                      rp["factor"])
    out = []
    for freq in inv:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(f)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / f + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model, path, arch: str, *, name: str = "tiny", kv: dict | None = None, permute_qk: bool = False,
               norm_plus_one: bool = False, extra_tensors: dict | None = None) -> str:
    """`kv`: extra metadata {key after "<arch>.": value} (soft-capping, expert counts, rope scaling...)."""
    import gguf

    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0)))
    rp = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in (kv or {}).items():
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_string(full, value)
    # a byte-level toy vocabulary: one token per id, no merges
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<{i}>" if i < 3 else chr(0x100 + i) for i in range(c.vocab_size)])
    w.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)

    names = gguf.get_tensor_name_map(_arch_enum(arch), c.num_hidden_layers)
    tied = getattr(c, "tie_word_embeddings", False)
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        data = t.detach().to(torch.float32).numpy().copy()
        base, _, suffix = hf_name.rpartition(".")
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] -> gate and up exps [E, I, H]
            blk = hf_name.split(".")[2]
            inter = data.shape[1] // 2
            w.add_tensor(f"blk.{blk}.ffn_gate_exps.weight", np.ascontiguousarray(data[:, :inter]))
            w.add_tensor(f"blk.{blk}.ffn_up_exps.weight", np.ascontiguousarray(data[:, inter:]))
            continue
        if suffix not in ("weight", "bias"):
            base, suffix = hf_name, "weight"
        gname = names.get_name(base)
        if gname is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        if permute_qk and gname.endswith(".attn_q"):
            data = _permute(data, heads)
        elif permute_qk and gname.endswith(".attn_k"):
            data = _permute(data, c.num_key_value_heads)
        if norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1
        w.add_tensor(f"{gname}.{suffix}", data)
    for tname, data in (extra_tensors or {}).items():
        w.add_tensor(tname, np.asarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
