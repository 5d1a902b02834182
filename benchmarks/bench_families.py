"""Families at real sizes: random-weight models with the real configs of Qwen3-1.7B, Phi-3.5-mini, Gemma-3-1B
and OLMo-2-1B. For each: the 16-bit rotated model's PPL against the original's (function preservation at real
width, bf16), and the time of the four non-SpinQuant OSP rows at W4A4KV4 (RTN, FFN Had, GPTQ, QuaRot).

  python benchmarks/bench_families.py                           # GPU: all four, 40 windows, GPTQ 128 x 2048
  python benchmarks/bench_families.py --models qwen3-1.7b --tiny --nwindows 2 --nsamples 2   # CPU smoke run

Random weights evaluate random token windows: the PPL itself means nothing (≈ vocab size); what counts is that
rotated == original at 16 bits and that every row runs, and how long it takes. Configs are the published ones
(hidden, layers, heads, KV heads, head_dim, FFN, vocab, norms, QK norm, sliding windows, rope theta); Phi-3.5's
longrope scaling is left out (it changes nothing below 4096 positions).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, save  # noqa: E402

from osp_eval import preset, quantize_  # noqa: E402
from osp_eval.arch import adapter_for_architecture  # noqa: E402
from osp_eval.ppl import perplexity  # noqa: E402

CONFIGS = {
    "qwen3-1.7b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=6144, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "phi-3.5-mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=32064, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=32000, sliding_window=262144)),
    "gemma-3-1b": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=6912, vocab_size=262144, max_position_embeddings=32768, rope_theta=1e6,
        rope_local_base_freq=10000.0, sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
        layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(26)],
        tie_word_embeddings=True)),
    "olmo-2-1b": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=8192, vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Qwen3-30B-A3B with 4 of its 48 layers (128 experts, top 8): per-layer cost, projected to the whole model.
    "qwen3-30b-a3b-4l": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}
FULL_LAYERS = {"qwen3-30b-a3b-4l": 48}
ROWS = {
    "rtn": dict(w_method="rtn"),
    "ffn_had": dict(w_method="rtn", rotate_down_proj=True),
    "gptq": dict(w_method="gptq", rotate_down_proj=True),
    "quarot": dict(w_method="gptq", rotate=True),
}


def build(name: str, tiny: bool, dtype, device, seed: int = 0):
    import transformers

    config_cls, model_cls, kw = CONFIGS[name]
    if tiny:  # the same family and head layout, small widths, for a CPU smoke run
        kw = {**kw, "hidden_size": 256 if name != "gemma-3-1b" else 288, "num_hidden_layers": 2,
              "intermediate_size": 512, "vocab_size": 512}
        if "num_experts" in kw:
            kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128)
        if "layer_types" in kw:
            kw["layer_types"] = kw["layer_types"][:2]
        if name == "phi-3.5-mini":
            kw.update(num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    config = getattr(transformers, config_cls)(**kw)
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, model_cls)(config).to(dtype)
    model.set_attn_implementation(adapter_for_architecture(model_cls).attn_implementation)
    return model.eval().requires_grad_(False)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(CONFIGS))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nwindows", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = []
    for name in args.models.split(","):
        vocab = CONFIGS[name][2]["vocab_size"] if not args.tiny else 512
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (args.nwindows * args.seqlen,), generator=g)
        calib = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=g)
        rec = {"model": name, "rows": {}}

        def evaluate(model):
            return perplexity(model, ids, args.seqlen, args.batch_size, progress=False)

        t_build = time.perf_counter()
        model = build(name, args.tiny, dtype, device)
        rec["build_seconds"] = time.perf_counter() - t_build
        rec["layers"] = model.config.num_hidden_layers
        rec["params_billion"] = sum(p.numel() for p in model.parameters()) / 1e9
        fp = evaluate(model)
        quantize_(model, preset("osp", rotate=True, center_embeddings=False, w_method="rtn"), progress=False)
        rot = evaluate(model)
        rec.update(fp_ppl=fp["ppl"], rotated16_ppl=rot["ppl"], rotated16_rel_diff=rot["ppl"] / fp["ppl"] - 1,
                   fp_tokens_per_second=fp["tokens_per_second"])
        print(f"{name}: {rec['params_billion']:.2f}B params; 16-bit PPL {fp['ppl']:.3f}, rotated {rot['ppl']:.3f} "
              f"({rec['rotated16_rel_diff']:+.2e}); fp {fp['tokens_per_second']:.0f} tok/s", flush=True)
        del model
        for row in args.rows.split(","):
            model = build(name, args.tiny, dtype, device)
            cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, nsamples=args.nsamples,
                         calib_seqlen=args.seqlen, **ROWS[row])
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with Timer() as tq:
                quantize_(model, cfg, calib if cfg.w_method == "gptq" else None, progress=False)
            r = evaluate(model)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            gptq = getattr(model, "osp_gptq_stats", {}) or {}
            if "experts" in gptq:  # routed calibration tokens per expert, layer 0; fallbacks
                tok = [v["samples"] for k, v in gptq["experts"][0].items() if k.startswith("gate.")]
                rec.setdefault("expert_tokens_layer0", {})[row] = {"min": min(tok), "max": max(tok),
                                                                   "fallbacks": len(gptq["expert_fallbacks"])}
            rec["rows"][row] = {"quantize_seconds": tq.seconds, "eval_seconds": r["eval_seconds"],
                                "gptq_layer_seconds": gptq.get("layer_seconds"),
                                "cell_seconds": tq.seconds + r["eval_seconds"], "ppl": r["ppl"],
                                "finite": math.isfinite(r["ppl"]), "tokens": r["tokens"],
                                "tokens_per_second": r["tokens_per_second"], "peak_gpu_gib": peak}
            print(f"  {row:8s} quantize {tq.seconds:7.1f}s  eval {r['eval_seconds']:6.1f}s  "
                  f"{r['tokens_per_second']:8.0f} tok/s  ppl {r['ppl']:.1f}  peak {peak and round(peak, 1)} GiB",
                  flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            save(f"bench_families_{'tiny_' if args.tiny else ''}{device}", {"args": vars(args), "models": out + [rec]})
        rec["four_rows_seconds"] = sum(v["cell_seconds"] for v in rec["rows"].values())
        print(f"  four rows: {rec['four_rows_seconds']:.1f}s of compute", flush=True)
        if name in FULL_LAYERS:  # the layers dominate: scale the measured cells to the whole depth
            scale = FULL_LAYERS[name] / rec["layers"]
            rec["projected_full_model"] = {"layers": FULL_LAYERS[name], "four_rows_seconds":
                                           rec["four_rows_seconds"] * scale}
            print(f"  projected to {FULL_LAYERS[name]} layers: {rec['four_rows_seconds'] * scale:.0f}s "
                  f"(x{scale:.0f}, embedding/lm_head counted at full depth: an upper bound)", flush=True)
        out.append(rec)
        save(f"bench_families_{'tiny_' if args.tiny else ''}{device}", {"args": vars(args), "models": out})


if __name__ == "__main__":
    main()
