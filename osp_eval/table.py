"""`osp-eval table`: the OSP README's PPL grid (methods × models × bit settings) in one command.

Each cell is an ordinary `run_ppl` result file, named by `ppl_result_path`, so cells computed earlier — by
this command or by `scripts/1_…4_` with the same settings — are reused, and an interrupted grid resumes.
A failing cell is recorded and the grid goes on.
"""

from __future__ import annotations

import csv
import json
import time
import traceback
from pathlib import Path

from tqdm.auto import tqdm

from .cli_args import add_model_args
from .config import preset
from .errors import OspEvalError
from .pipeline import model_slug, ppl_result_path, run_ppl

# The OSP README's rows, as recipe overrides on the preset.
METHODS = {
    "rtn": dict(w_method="rtn"),
    "ffn_had": dict(w_method="rtn", rotate_down_proj=True),
    "gptq": dict(w_method="gptq", rotate_down_proj=True),
    "quarot": dict(w_method="gptq", rotate=True),
    "spinquant": dict(w_method="gptq", rotate=True),  # + a trained R.bin, see _spinquant_rotation
}
ROW_NAMES = {"rtn": "RTN", "ffn_had": "+ FFN Had", "gptq": "+ GPTQ", "quarot": "+ QuaRot", "spinquant": "+ SpinQuant"}


def parse_bits(s: str) -> tuple[int, int, int]:
    try:
        w, a, kv = (int(x) for x in s.split("-"))
    except ValueError as e:
        raise OspEvalError(f"--bits {s!r}: expected W-A-KV, e.g. 4-4-4") from e
    return w, a, kv


def cell_config(method: str, bits: str, preset_name: str = "osp", **overrides):
    if method not in METHODS:
        raise OspEvalError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    w, a, kv = parse_bits(bits)
    return preset(preset_name, w_bits=w, a_bits=a, k_bits=kv, v_bits=kv, **METHODS[method], **overrides)


def _spinquant_rotation(model: str, cfg, args) -> str:
    """Train (once per model and bit setting, cached next to the results) the SpinQuant R.bin for a cell."""
    from .spinquant import spinquant_train

    tag = f"a{cfg.a_bits}kv{cfg.k_bits}_s{args.spinquant_steps}_n{args.spinquant_nsamples}_l{args.spinquant_seqlen}"
    path = Path(args.output_dir) / "rotations" / model_slug(model) / f"R_{tag}.bin"
    if not path.exists():
        spinquant_train(model, cfg, save_path=str(path), steps=args.spinquant_steps, nsamples=args.spinquant_nsamples,
                        seqlen=args.spinquant_seqlen, data_dir=args.data_dir, device=args.device, dtype=args.dtype,
                        progress=not args.no_progress)
    return str(path)


def run_table(args) -> dict:
    models, bits_list = args.models, args.bits or ["4-4-4"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = {k: getattr(args, k) for k in ("calib_data", "nsamples", "calib_seqlen")
                 if getattr(args, k, None) is not None}
    cells = [(m, b, meth) for m in models for b in bits_list for meth in methods]
    for _, b, meth in cells:  # validate the whole grid before spending time on it
        cell_config(meth, b, args.preset, **overrides)
    results, failures, t0 = {}, [], time.perf_counter()
    bar = tqdm(cells, desc="grid", disable=args.no_progress)
    for i, (model, bits, meth) in enumerate(bar):
        bar.set_postfix_str(f"{model_slug(model)} {meth} {bits}")
        try:
            cfg = cell_config(meth, bits, args.preset, **overrides)
            path = ppl_result_path(args.output_dir, model, cfg, seqlen=args.seqlen, max_windows=args.max_windows,
                                   dtype=args.dtype, device=args.device)
            train_seconds = 0.0
            if meth == "spinquant":
                cfg = cfg.replace(optimized_rotation_path=_spinquant_rotation(model, cfg, args))
                train_seconds = json.loads(Path(f"{cfg.optimized_rotation_path}.json").read_text())["train_seconds"]
                path = ppl_result_path(args.output_dir, model, cfg, seqlen=args.seqlen,
                                       max_windows=args.max_windows, dtype=args.dtype, device=args.device)
            if path.exists():
                rec = json.loads(path.read_text())
                rec["cached"] = True
                rec.setdefault("result_path", str(path))
            else:
                rec = run_ppl(model, cfg, dtype=args.dtype, device=args.device, data_dir=args.data_dir,
                              seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                              output_dir=args.output_dir, progress=False)
                rec["cached"] = False
            # Compute time of the cell (model loading excluded): rotation training + quantization + evaluation.
            rec["cell_seconds"] = train_seconds + rec.get("quantize_seconds", 0.0) + rec.get("eval_seconds", 0.0)
            results[(model, bits, meth)] = rec
        except Exception as e:  # one failing cell must not kill the grid
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            failures.append({"model": model, "bits": bits, "method": meth, "error": msg,
                             "traceback": traceback.format_exc() if not isinstance(e, OspEvalError) else None})
            tqdm.write(f"cell failed: {model_slug(model)} {meth} {bits}: {msg}")
        done = i + 1
        eta = (time.perf_counter() - t0) / done * (len(cells) - done)
        bar.set_postfix_str(f"eta {eta:.0f}s")
    return write_reports(args, models, bits_list, methods, results, failures, time.perf_counter() - t0)


def write_reports(args, models, bits_list, methods, results, failures, seconds) -> dict:
    out = Path(args.output_dir) / "table"
    out.mkdir(parents=True, exist_ok=True)
    slugs = [model_slug(m) for m in models]
    md = [f"# WikiText-2 perplexity (seqlen {args.seqlen}"
          + (f", first {args.max_windows} windows" if args.max_windows else ", full test split") + ")", ""]
    rows = []
    for bits in bits_list:
        md += [f"## W-A-KV {bits}", "", "| Method | " + " | ".join(slugs) + " |",
               "|---|" + "---:|" * len(slugs)]
        for meth in methods:
            cells = []
            for m in models:
                r = results.get((m, bits, meth))
                cells.append(f"{r['ppl']:.2f}" if r else "failed")
                rows.append({"model": model_slug(m), "bits": bits, "method": meth,
                             "ppl": r["ppl"] if r else None, "cached": r.get("cached") if r else None,
                             "seconds": round(r["cell_seconds"], 2) if r else None,
                             "result": r.get("result_path") if r else None})
            md.append(f"| {ROW_NAMES.get(meth, meth)} | " + " | ".join(cells) + " |")
        md.append("")
    compute = sum(r["seconds"] or 0.0 for r in rows)
    md += ["", f"Compute time of the grid: {compute:.1f} s (per cell: rotation training + quantization + evaluation, "
           "model loading excluded; cached cells count their original time). This invocation: "
           f"{seconds:.1f} s wall."]
    if failures:
        md += ["", "## Failed cells", ""]
        md += [f"- {f['model']} {f['method']} {f['bits']}: {f['error']}" for f in failures]
    (out / "table.md").write_text("\n".join(md) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "bits", "method", "ppl", "cached", "seconds", "result"])
        w.writeheader()
        w.writerows(rows)
    _plot(out / "table.png", slugs, bits_list, methods, rows)
    summary = {"seconds": seconds, "compute_seconds": compute, "cells": len(rows),
               "computed": sum(1 for r in rows if r["cached"] is False),
               "failed": failures, "files": [str(out / n) for n in ("table.md", "table.csv", "table.png")]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot(path: Path, slugs, bits_list, methods, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bits_list), figsize=(max(5, 1.6 * len(methods) * len(slugs) / 2 + 2) *
                                                          len(bits_list), 4), squeeze=False)
    width = 0.8 / max(1, len(slugs))
    for ax, bits in zip(axes[0], bits_list):
        for j, slug in enumerate(slugs):
            ys = [next((r["ppl"] for r in rows if r["model"] == slug and r["bits"] == bits and r["method"] == m),
                       None) for m in methods]
            xs = [i + (j - (len(slugs) - 1) / 2) * width for i in range(len(methods))]
            bars = ax.bar([x for x, y in zip(xs, ys) if y], [y for y in ys if y], width, label=slug)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1)  # PPL >= 1: bars start at the same floor on the log axis
        ax.set_xticks(range(len(methods)), [ROW_NAMES.get(m, m) for m in methods], rotation=20)
        ax.set_ylabel("WikiText-2 PPL (log)")
        ax.set_title(f"W-A-KV {bits}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd(args) -> None:
    s = run_table(args)
    print((Path(args.output_dir) / "table" / "table.md").read_text())
    print(f"{s['cells']} cells ({s['computed']} computed, {len(s['failed'])} failed) in {s['seconds']:.1f}s; "
          f"files: {', '.join(s['files'])}")


def add_cli(sub) -> None:
    p = sub.add_parser("table", help="the OSP README's PPL grid: methods × models × bit settings")
    add_model_args(p)
    p.add_argument("more_models", nargs="*", help="further models (columns)")
    p.add_argument("--bits", action="append", help="W-A-KV, repeatable (default 4-4-4)")
    p.add_argument("--methods", default="rtn,ffn_had,gptq,quarot,spinquant")
    p.add_argument("--preset", default="osp")
    p.add_argument("--calib_data", default=None)
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--calib_seqlen", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_windows", type=int, default=None)
    p.add_argument("--spinquant_steps", type=int, default=100, help="rotation training steps (SpinQuant row)")
    p.add_argument("--spinquant_nsamples", type=int, default=800, help="rotation training windows")
    p.add_argument("--spinquant_seqlen", type=int, default=2048, help="rotation training window length")
    p.set_defaults(func=lambda a: _cmd(_with_models(a)))


def _with_models(args):
    args.models = [args.model, *args.more_models]
    return args
