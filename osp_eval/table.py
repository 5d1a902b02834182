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


def _lighteval_cell(model: str, cfg, ppl_path: Path, qpath: Path | None, args) -> dict:
    """The cell's lighteval summary: cached next to the table by (PPL cell, tasks, max_samples), else run."""
    from .lighteval_run import run_lighteval
    from .results import cell_key

    key = cell_key(tasks=args.tasks, max_samples=args.max_samples, max_length=args.max_length)
    path = Path(args.output_dir) / "table" / "lighteval" / model_slug(model) / f"{ppl_path.stem}_{key}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    rec = run_lighteval(model, cfg, tasks=args.tasks, dtype=args.dtype, device=args.device, data_dir=args.data_dir,
                        max_samples=args.max_samples, batch_size=args.lighteval_batch_size,
                        max_length=args.max_length, output_dir=args.output_dir, progress=False,
                        load_qmodel_path=str(qpath) if qpath and qpath.exists() else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    return {**rec, "cached": False}


def run_table(args) -> dict:
    models, bits_list = args.models, args.bits or ["4-4-4"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = {k: getattr(args, k) for k in ("calib_data", "nsamples", "calib_seqlen")
                 if getattr(args, k, None) is not None}
    cells = [(m, b, meth) for m in models for b in bits_list for meth in methods]
    for _, b, meth in cells:  # validate the whole grid before spending time on it
        cell_config(meth, b, args.preset, **overrides)
    if args.tasks:
        from .lighteval_run import parse_tasks

        parse_tasks(args.tasks)
    results, failures, t0 = {}, [], time.perf_counter()

    def failed(model, bits, meth, e, metric="ppl"):  # one failing cell must not kill the grid
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        failures.append({"model": model, "bits": bits, "method": meth, "metric": metric, "error": msg,
                         "traceback": traceback.format_exc() if not isinstance(e, OspEvalError) else None})
        tqdm.write(f"cell failed: {model_slug(model)} {meth} {bits} ({metric}): {msg}")

    bar = tqdm(cells, desc="grid", disable=args.no_progress)
    for i, (model, bits, meth) in enumerate(bar):
        eta = f", eta {(time.perf_counter() - t0) / i * (len(cells) - i):.0f}s" if i else ""
        bar.set_postfix_str(f"{model_slug(model)} {meth} {bits}{eta}")
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
            # With --tasks, GPTQ weights are saved once and the lighteval run loads them (no second GPTQ).
            qpath = (Path(args.output_dir) / "qmodels" / model_slug(model) / f"{path.stem}.pt"
                     if args.tasks and cfg.w_bits < 16 and cfg.w_method == "gptq" else None)
            if path.exists():
                rec = json.loads(path.read_text())
                rec["cached"] = True
                rec.setdefault("result_path", str(path))
            else:
                rec = run_ppl(model, cfg, dtype=args.dtype, device=args.device, data_dir=args.data_dir,
                              seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                              output_dir=args.output_dir, progress=False,
                              save_qmodel_path=str(qpath) if qpath else None)
                rec["cached"] = False
            # Compute time of the cell (model loading excluded): rotation training + quantization + evaluation.
            rec["cell_seconds"] = train_seconds + rec.get("quantize_seconds", 0.0) + rec.get("eval_seconds", 0.0)
            results[(model, bits, meth)] = rec
        except Exception as e:
            failed(model, bits, meth, e)
            continue
        if args.tasks:
            try:
                rec["lighteval"] = _lighteval_cell(model, cfg, path, qpath, args)
            except Exception as e:
                failed(model, bits, meth, e, "lighteval")
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
                le = (r or {}).get("lighteval") or {}
                rows.append({"model": model_slug(m), "bits": bits, "method": meth,
                             "ppl": r["ppl"] if r else None, "cached": r.get("cached") if r else None,
                             "seconds": round(r["cell_seconds"], 2) if r else None,
                             "result": r.get("result_path") if r else None,
                             "lighteval_average": le.get("average"), "lighteval_average_all": le.get("average_all"),
                             "lighteval_seconds": round(le["total_seconds"], 2) if le else None,
                             "lighteval_cached": le.get("cached"), "lighteval_result": le.get("result_path")})
            md.append(f"| {ROW_NAMES.get(meth, meth)} | " + " | ".join(cells) + " |")
        md.append("")
    if args.tasks:
        md += _lighteval_md(args, slugs, bits_list, methods, rows)
    compute = sum((r["seconds"] or 0.0) + (r["lighteval_seconds"] or 0.0) for r in rows)
    md += ["", f"Compute time of the grid: {compute:.1f} s (per cell: rotation training + quantization + evaluation, "
           "model loading excluded except in lighteval runs; cached cells count their original time). This invocation: "
           f"{seconds:.1f} s wall."]
    if failures:
        md += ["", "## Failed cells", ""]
        md += [f"- {f['model']} {f['method']} {f['bits']} ({f['metric']}): {f['error']}" for f in failures]
    (out / "table.md").write_text("\n".join(md) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)
    _plot(out / "table.png", slugs, bits_list, methods, rows)
    summary = {"seconds": seconds, "compute_seconds": compute, "cells": len(rows),
               "computed": sum(1 for r in rows if r["cached"] is False),
               "lighteval_computed": sum(1 for r in rows if r["lighteval_cached"] is False),
               "failed": failures, "files": [str(out / n) for n in ("table.md", "table.csv", "table.png")]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pct(v) -> str:
    """A lighteval score (0..1) as a markdown table cell, in %."""
    return "-" if v is None else f"{100 * v:.2f}"


def _lighteval_md(args, slugs, bits_list, methods, rows) -> list[str]:
    """The lighteval section: per method and model, the average over exact-data benchmarks (and over all)."""
    md = [f"# Lighteval benchmarks ({args.tasks}" + (f", first {args.max_samples} docs per task" if args.max_samples
                                                      else ", full splits") + ")", "",
          "Average accuracy (%) over the benchmarks scored on exact data; in brackets, including the not-exact local "
          "copies. Per-task numbers: the lighteval_result files.", ""]
    for bits in bits_list:
        md += [f"## W-A-KV {bits}", "", "| Method | " + " | ".join(slugs) + " |", "|---|" + "---:|" * len(slugs)]
        for meth in methods:
            cells = []
            for slug in slugs:
                r = next(x for x in rows if x["model"] == slug and x["bits"] == bits and x["method"] == meth)
                cells.append("failed" if r["lighteval_result"] is None else
                             f"{pct(r['lighteval_average'])} ({pct(r['lighteval_average_all'])})")
            md.append(f"| {ROW_NAMES.get(meth, meth)} | " + " | ".join(cells) + " |")
        md.append("")
    return md


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
    le = f", lighteval: {s['lighteval_computed']} computed" if args.tasks else ""
    print(f"{s['cells']} cells ({s['computed']} computed, {len(s['failed'])} failed{le}) in {s['seconds']:.1f}s; "
          f"files: {', '.join(s['files'])}")


def add_cli(sub) -> None:
    from .lighteval_run import DEFAULT_BATCH  # lighteval itself is imported lazily, not here

    p = sub.add_parser("table", help="the OSP README's PPL grid: methods × models × bit settings")
    add_model_args(p)
    p.add_argument("more_models", nargs="*", help="further models (columns)")
    p.add_argument("--bits", action="append", help="W-A-KV, repeatable (default 4-4-4)")
    p.add_argument("--methods", default="rtn,ffn_had,gptq,quarot,spinquant")
    p.add_argument("--preset", default="osp", help="recipe preset: osp (the OSP scripts) or quarot_paper")
    p.add_argument("--calib_data", default=None,
                   help="GPTQ / SpinQuant data: wikitext2 (train, the reference's; needs the hub), c4, or a text file")
    p.add_argument("--nsamples", type=int, default=None, help="GPTQ calibration windows (default 128)")
    p.add_argument("--calib_seqlen", type=int, default=None, help="GPTQ calibration window length (default 2048)")
    p.add_argument("--seqlen", type=int, default=2048, help="WikiText-2 window length")
    p.add_argument("--batch_size", type=int, default=4, help="PPL windows per forward")
    p.add_argument("--max_windows", type=int, default=None, help="only the first N windows (partial numbers)")
    p.add_argument("--tasks", default=None,
                   help="also run these lighteval tasks for every cell (a tasks file such as tasks/tasks.txt, or "
                        "task|shots entries); GPTQ and SpinQuant rotations are reused, not recomputed")
    p.add_argument("--max_samples", type=int, default=None, help="lighteval: docs per task (partial numbers)")
    p.add_argument("--lighteval_batch_size", type=int, default=DEFAULT_BATCH, help="lighteval_ptq.py's --batch_size")
    p.add_argument("--max_length", type=int, default=None, help="lighteval_ptq.py's --max_length")
    p.add_argument("--spinquant_steps", type=int, default=100, help="rotation training steps (SpinQuant row)")
    p.add_argument("--spinquant_nsamples", type=int, default=800, help="rotation training windows")
    p.add_argument("--spinquant_seqlen", type=int, default=2048, help="rotation training window length")
    p.set_defaults(func=lambda a: _cmd(_with_models(a)))


def _with_models(args):
    args.models = [args.model, *args.more_models]
    return args
