"""Time WikiText-2-style PPL evaluation (tokens/s) and the quantization step, per method.

  python benchmarks/bench_ppl.py --model random-osp-1.4b --methods fp,rtn,ffn_had   # GPU
  python benchmarks/bench_ppl.py --model smollm2 --data_dir ../shared/data --nwindows 4
  python benchmarks/bench_ppl.py --model tiny --nwindows 2                          # CPU smoke run
  python benchmarks/bench_ppl.py --methods fp,rtn,ffn_had,quarot_rtn --kernels reference,triton   # both paths
  python benchmarks/bench_ppl.py --methods fp,rtn,ffn_had --kernels triton --cuda_graphs  # + CUDA-graph replays
  python benchmarks/bench_ppl.py --methods fp,rtn --kernels triton --compile   # + torch.compile (exploratory)

With several `--kernels`, each quantized model is evaluated by every path in turn (same process, same weights:
osp_eval.apply.set_kernels switches the quantizers) and the row reports each path's tokens/s, the max abs
difference of the last batch's logits and the PPL difference against the first path (the kernels promise 0).

The random model evaluates random token windows (timing only; its PPL means nothing). The online Hadamard
overhead is the eval time of `ffn_had` over `rtn` (both W4A4KV4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, osp_1p4b_config, random_model, save  # noqa: E402

from osp_eval import preset, quantize_  # noqa: E402
from osp_eval.apply import set_kernels  # noqa: E402
from osp_eval.kernels import resolve_kernels  # noqa: E402
from osp_eval.ppl import perplexity  # noqa: E402

METHODS = {
    "fp": dict(),
    "rtn": dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn"),
    "ffn_had": dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", rotate_down_proj=True),
    "quarot_rtn": dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", rotate=True),
    "w16a4": dict(a_bits=4, k_bits=4, v_bits=4),
    "w16a4_had": dict(a_bits=4, k_bits=4, v_bits=4, rotate_down_proj=True),
}


@torch.no_grad()
def last_logits(model, ids, seqlen, batch_size, device):
    """Logits of the first batch of windows (float32, on the CPU): what the paths are compared on."""
    n = min(batch_size, len(ids) // seqlen)
    x = ids[: n * seqlen].view(n, seqlen).to(device)
    return model(x).logits.float().cpu()


def build(args, device, dtype):
    if args.model in ("random-osp-1.4b", "tiny"):
        return random_model(osp_1p4b_config(tiny=args.model == "tiny"), dtype, device), None
    from osp_eval.models import load_model

    return load_model(args.model, dtype=dtype, device=device)


def graphs_row(model, ids, args, device, row, first_ppl) -> dict:
    """The same windows through a CUDA graph of the forward (osp_eval.ppl.graphed_forward, captured once, its
    first replay checked bit for bit against the eager forward): steady-state tokens/s of the replays."""
    import math

    from osp_eval.ppl import _window_loss, graphed_forward, make_windows

    windows = make_windows(ids, args.seqlen, args.nwindows)
    full = len(windows) // args.batch_size * args.batch_size
    out = {**row, "kernels": row["kernels"] + "+graphs", "cuda_graphs": False}
    with torch.no_grad():
        run = graphed_forward(model, windows[: args.batch_size].to(device)) if device == "cuda" else None
        if run is None or full == 0:
            print(f"{row['method']:12s} {out['kernels']}: no CUDA graph here")
            return out
        best, nlls, logits = None, None, None
        for _ in range(args.repeats):
            with Timer() as t:
                parts = []
                for i in range(0, full, args.batch_size):
                    batch = windows[i : i + args.batch_size].to(device)
                    logits = run(batch)
                    parts.append(_window_loss(logits, batch))
            best, nlls = min(best or t.seconds, t.seconds), torch.cat(parts).cpu()
    ppl = math.exp(nlls.mean().item())
    out |= {"cuda_graphs": True, "eval_seconds": best, "tokens": full * args.seqlen,
            "tokens_per_second": full * args.seqlen / best, "ppl": ppl, "ppl_diff_vs_first": ppl - first_ppl}
    print(f"{row['method']:12s} {out['kernels']:16s} eval {best:7.2f}s  {out['tokens_per_second']:10.0f} tok/s  "
          f"ppl {ppl:.4f}  dppl {ppl - first_ppl:.3g}", flush=True)
    return out


def compile_row(model, ids, args, row, first_ppl, first_logits, device) -> dict:
    """The same windows through `torch.compile(model.forward)` (exploratory: Inductor fuses the norms, RoPE and
    casts, so values differ from eager by float rounding; the row reports by how much)."""
    import time

    import torch._dynamo

    eager = model.forward
    out = {**row, "kernels": row["kernels"] + "+compile"}
    torch._dynamo.utils.counters.clear()  # graph breaks of this row only
    try:
        model.forward = torch.compile(eager, dynamic=False)
        t0 = time.perf_counter()
        perplexity(model, ids, args.seqlen, args.batch_size, max_windows=args.batch_size, progress=False)
        out["compile_seconds"] = time.perf_counter() - t0
        best = None
        for _ in range(args.repeats):
            r = perplexity(model, ids, args.seqlen, args.batch_size, max_windows=args.nwindows, progress=False)
            best = r if best is None or r["eval_seconds"] < best["eval_seconds"] else best
        logits = last_logits(model, ids, args.seqlen, args.batch_size, device)
        out |= {"eval_seconds": best["eval_seconds"], "tokens_per_second": best["tokens_per_second"],
                "ppl": best["ppl"], "ppl_diff_vs_first": best["ppl"] - first_ppl,
                "max_abs_logit_diff_vs_first": (logits - first_logits).abs().max().item(),
                "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
        print(f"{row['method']:12s} {out['kernels']:16s} compile {out['compile_seconds']:5.1f}s eval "
              f"{best['eval_seconds']:7.2f}s  {best['tokens_per_second']:10.0f} tok/s  ppl {best['ppl']:.4f}  dlogit "
              f"{out['max_abs_logit_diff_vs_first']:.3g}  dppl {out['ppl_diff_vs_first']:.3g}  graph breaks "
              f"{out['graph_breaks']}", flush=True)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"{row['method']:12s} {out['kernels']}: compile failed ({out['error']})", flush=True)
    finally:
        model.forward = eager
        torch._dynamo.reset()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random-osp-1.4b")
    p.add_argument("--methods", default="fp,rtn,ffn_had,w16a4,w16a4_had")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nwindows", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--repeats", type=int, default=2, help="timed passes; the best is reported")
    p.add_argument("--kernels", default="reference", help="comma list of reference|triton|auto, timed side by side")
    p.add_argument("--cuda_graphs", action="store_true", help="also time each path replaying a CUDA graph")
    p.add_argument("--compile", action="store_true", help="also time each path under torch.compile (exploratory)")
    args = p.parse_args()
    paths = [k.strip() for k in args.kernels.split(",") if k.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name in args.methods.split(","):
        model, tok = build(args, device, dtype)
        vocab = model.config.vocab_size
        if tok is not None and args.data_dir:
            from osp_eval.data import tokenize_text, wikitext2_text

            ids = tokenize_text(tok, wikitext2_text("test", args.data_dir))
        else:
            ids = torch.randint(0, vocab, (args.nwindows * args.seqlen,), generator=torch.Generator().manual_seed(0))
        cfg = preset("osp", **METHODS[name], kernels=paths[0])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with Timer() as tq:
            quantize_(model, cfg, progress=False)
        first_logits = first_ppl = None
        for path in paths:
            set_kernels(model, path)
            perplexity(model, ids, args.seqlen, args.batch_size, max_windows=args.batch_size, progress=False)  # warm-up
            best = None
            for _ in range(args.repeats):
                r = perplexity(model, ids, args.seqlen, args.batch_size, max_windows=args.nwindows, progress=False)
                best = r if best is None or r["eval_seconds"] < best["eval_seconds"] else best
            logits = last_logits(model, ids, args.seqlen, args.batch_size, device)
            if first_logits is None:
                first_logits, first_ppl = logits, best["ppl"]
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            row = {"method": name, "kernels": path, "kernels_resolved": resolve_kernels(path, device),
                   "quantize_seconds": tq.seconds, "eval_seconds": best["eval_seconds"], "tokens": best["tokens"],
                   "tokens_per_second": best["tokens_per_second"], "ppl": best["ppl"], "peak_gib": peak,
                   "max_abs_logit_diff_vs_first": (logits - first_logits).abs().max().item(),
                   "ppl_diff_vs_first": best["ppl"] - first_ppl}
            rows.append(row)
            print(f"{name:12s} {path:9s} quantize {tq.seconds:7.2f}s  eval {best['eval_seconds']:7.2f}s  "
                  f"{best['tokens_per_second']:10.0f} tok/s  ppl {best['ppl']:.4f}  "
                  f"dlogit {row['max_abs_logit_diff_vs_first']:.3g}  dppl {row['ppl_diff_vs_first']:.3g}  "
                  f"peak {peak} GiB", flush=True)
            if args.cuda_graphs:
                rows.append(graphs_row(model, ids, args, device, row, first_ppl))
            if args.compile:
                rows.append(compile_row(model, ids, args, row, first_ppl, first_logits, device))
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    by = {(r["method"], r["kernels"]): r for r in rows}
    for path in paths:
        for a, b in (("rtn", "ffn_had"), ("w16a4", "w16a4_had")):
            if (a, path) in by and (b, path) in by:
                ra, rb = by[a, path], by[b, path]
                print(f"online Hadamard overhead ({b} vs {a}, {path}): "
                      f"{rb['eval_seconds'] / ra['eval_seconds'] - 1:+.1%}")
    fp = next((r for r in rows if r["method"] == "fp"), None)
    if fp:
        for r in rows:
            r["slowdown_vs_fp"] = fp["tokens_per_second"] / r["tokens_per_second"]
        print("slowdown vs fp: " + ", ".join(f"{r['method']}/{r['kernels']} {r['slowdown_vs_fp']:.2f}x" for r in rows))
    slug = Path(args.model).name.removesuffix(".gguf").replace(".", "_")
    save(f"bench_ppl_{slug}_{device}", {"args": vars(args), "kernels": paths, "rows": rows})


if __name__ == "__main__":
    main()
