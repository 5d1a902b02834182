"""`osp-eval table`: the OSP README's PPL grid (methods × models × bit settings) in one command.

Each cell is an ordinary `osp-eval ppl` result file, named by `ppl_result_path` from the cell's identity (model
and data contents, the recipe's active fields; see provenance.py), so cells computed earlier — by this command
or by `scripts/1_…4_` with the same inputs — are reused, and an interrupted grid resumes; a cached cell whose
stored identity differs, or that cannot be read, is recomputed. Every input is checked before the first cell
runs (bad input: one line, exit 2). A cell that fails while computing is recorded, the grid goes on, and the
command exits 1 with a summary of the failures.
"""

from __future__ import annotations

import csv
import io
import sys
import time
import traceback
from pathlib import Path

from tqdm.auto import tqdm

from .cli_args import KERNELS_HELP, add_model_args, add_offload_arg, positive_int
from .config import KERNELS, preset
from .data import calibration_text, wikitext2_data
from .errors import OspEvalError
from .pipeline import model_slug, ppl_result_path
from .provenance import write_json_atomic, write_text_atomic

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


def _warn(msg: str) -> None:
    tqdm.write(f"osp-eval: warning: {msg}", file=sys.stderr)


def column_labels(models: list[str]) -> list[str]:
    """Column names: the model's folder/file name, with parent folders added until two models differ."""
    labels = [model_slug(m) for m in models]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 6:
        depth += 1
        labels = ["/".join(Path(m.rstrip("/")).parts[-depth:]) for m in models]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]
    return labels


def _spinquant_rotation(model: str, cfg, inputs, args) -> tuple[str, float]:
    """The SpinQuant R.bin of a cell: trained once per (model contents, calibration text, training recipe) and
    cached next to the results; reused only when its sidecar's identity matches. Returns (path, train seconds)."""
    from .pipeline import _dtype_name
    from .provenance import digest, read_cached, text_sha256, version
    from .spinquant import spinquant_train, training_config

    calib = inputs.calibration_sha256 or text_sha256(calibration_text(cfg.calib_data, args.data_dir)[0])
    identity = {"kind": "spinquant_rotation", "osp_eval": version(), "model": inputs.fingerprint.get("digest"),
                "calibration": calib, "calib_seed": cfg.seed, "config": training_config(cfg).identity(),
                "steps": args.spinquant_steps, "nsamples": args.spinquant_nsamples, "seqlen": args.spinquant_seqlen,
                "dtype": _dtype_name(args.dtype, inputs.device)}
    tag = f"a{cfg.a_bits}kv{cfg.k_bits}_s{args.spinquant_steps}_n{args.spinquant_nsamples}_l{args.spinquant_seqlen}"
    path = Path(args.output_dir) / "rotations" / model_slug(model) / f"R_{tag}_{digest(identity)[:12]}.bin"
    meta = read_cached(f"{path}.json", identity, _warn) if path.is_file() else None
    if meta is None:
        meta = spinquant_train(model, cfg, save_path=str(path), steps=args.spinquant_steps,
                               nsamples=args.spinquant_nsamples, seqlen=args.spinquant_seqlen,
                               data_dir=args.data_dir, device=args.device, dtype=args.dtype,
                               progress=not args.no_progress, identity=identity,
                               recompute_rotations=getattr(args, "spinquant_recompute_rotations", False))
    return str(path), meta["train_seconds"]


def _lighteval_cell(model: str, cfg, qpath: Path | None, args) -> dict:
    """The cell's lighteval summary: the cached one when its identity matches, else a new run."""
    from .lighteval_run import lighteval_plan, parse_tasks, run_lighteval
    from .provenance import read_cached

    load = str(qpath) if qpath and qpath.exists() else None
    kw = dict(dtype=args.dtype, device=args.device, data_dir=args.data_dir, max_samples=args.max_samples,
              batch_size=args.lighteval_batch_size, max_length=args.max_length, output_dir=args.output_dir,
              load_qmodel_path=load)
    plan = lighteval_plan(model, cfg, parse_tasks(args.tasks), **kw)
    rec = read_cached(plan["out"] / f"{plan['stem']}.json", plan["identity"], _warn)
    if rec is not None:
        return {**rec, "cached": True}
    rec = run_lighteval(model, cfg, tasks=args.tasks, progress=not args.no_progress, **kw)
    return {**rec, "cached": False}


def preflight_grid(args, models, bits_list, methods, overrides) -> tuple[dict, tuple[str, dict]]:
    """Check every input of every cell before any compute: flags, data, output folder, each model's files and
    dimensions against each recipe, calibration data, the tasks. Returns ({cell: (cfg, Inputs)}, eval data)."""
    from .pipeline import check_positive, preflight
    from .provenance import check_writable

    if not methods:
        raise OspEvalError(f"--methods names no method: choose from {', '.join(METHODS)}")
    check_positive(seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                   spinquant_steps=args.spinquant_steps, spinquant_nsamples=args.spinquant_nsamples,
                   spinquant_seqlen=args.spinquant_seqlen)
    cfgs = {(b, meth): cell_config(meth, b, args.preset, **overrides) for b in bits_list for meth in methods}
    data = wikitext2_data("test", args.data_dir)
    check_writable(args.output_dir)
    if args.tasks:
        from .lighteval_run import parse_tasks

        parse_tasks(args.tasks)
    plan = {}
    for m in models:
        for (b, meth), cfg in cfgs.items():
            inputs = preflight(m, cfg, dtype=args.dtype, device=args.device, data_dir=args.data_dir,
                               seqlen=args.seqlen)
            if meth == "spinquant":  # rotation training reads the calibration data whatever the weights
                calibration_text(cfg.calib_data, args.data_dir)
            plan[m, b, meth] = (cfg, inputs)
    return plan, data


def run_table(args) -> dict:
    from .pipeline import evaluate_ppl, nonfinite_reason, ppl_identity, save_ppl
    from .provenance import file_sha256, read_cached

    models, bits_list = args.models, args.bits or ["4-4-4"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = {k: getattr(args, k) for k in ("calib_data", "nsamples", "calib_seqlen", "kernels")
                 if getattr(args, k, None) is not None}
    plan, data = preflight_grid(args, models, bits_list, methods, overrides)
    cells = list(plan)
    results, failures, t0 = {}, [], time.perf_counter()

    def failed(model, bits, meth, e, metric="ppl"):  # one failing cell must not kill the grid
        msg = " ".join(str(e).split()) or type(e).__name__
        failures.append({"model": model, "bits": bits, "method": meth, "metric": metric, "error": msg,
                         "traceback": traceback.format_exc() if isinstance(e, Exception)
                         and not isinstance(e, OspEvalError) else None})
        tqdm.write(f"cell failed: {model_slug(model)} {meth} {bits} ({metric}): {msg}", file=sys.stderr)

    bar = tqdm(cells, desc="grid", disable=args.no_progress)
    for i, (model, bits, meth) in enumerate(bar):
        eta = f", eta {(time.perf_counter() - t0) / i * (len(cells) - i):.0f}s" if i else ""
        bar.set_postfix_str(f"{model_slug(model)} {meth} {bits}{eta}")
        cfg, inputs = plan[model, bits, meth]
        try:
            train_seconds = 0.0
            if meth == "spinquant":
                rot, train_seconds = _spinquant_rotation(model, cfg, inputs, args)
                cfg = cfg.replace(optimized_rotation_path=rot)
                inputs.rotation_sha256 = file_sha256(rot)
            identity = ppl_identity(inputs, cfg, data[1], seqlen=args.seqlen, max_windows=args.max_windows,
                                    dtype=args.dtype, compile=getattr(args, "compile", False))
            path = ppl_result_path(args.output_dir, model, cfg, identity)
            # With --tasks, GPTQ weights are saved once and the lighteval run loads them (no second GPTQ).
            qpath = (Path(args.output_dir) / "qmodels" / model_slug(model) / f"{path.stem}.pt"
                     if args.tasks and cfg.w_bits < 16 and cfg.w_method == "gptq" else None)
            rec = read_cached(path, identity, _warn) if identity["model"] else None
            if rec is not None:
                rec["cached"] = True
                rec["result_path"] = str(path)
            else:
                rec = evaluate_ppl(model, cfg, dtype=args.dtype, device=args.device, data_dir=args.data_dir,
                                   seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                                   output_dir=args.output_dir, progress=not args.no_progress,
                                   save_qmodel_path=str(qpath) if qpath else None, inputs=inputs, data=data,
                                   offload=getattr(args, "offload", "auto"),
                                   cuda_graphs=getattr(args, "cuda_graphs", False),
                                   compile=getattr(args, "compile", False))
                save_ppl(rec)
                rec["cached"] = False
            # Compute time of the cell (model loading excluded): rotation training + quantization + evaluation.
            rec["cell_seconds"] = train_seconds + rec.get("quantize_seconds", 0.0) + rec.get("eval_seconds", 0.0)
            rec["status"] = "ok" if rec.get("ppl_finite", True) and rec.get("ppl") is not None else "nonfinite"
            results[(model, bits, meth)] = rec
            if rec["status"] == "nonfinite":
                failed(model, bits, meth, OspEvalError(nonfinite_reason(rec)))
                continue
        except Exception as e:
            failed(model, bits, meth, e)
            continue
        if args.tasks:
            try:
                rec["lighteval"] = _lighteval_cell(model, cfg, qpath, args)
            except Exception as e:
                failed(model, bits, meth, e, "lighteval")
    return write_reports(args, models, bits_list, methods, results, failures, time.perf_counter() - t0, data[1])


def table_subtitle(args, data: dict) -> str:
    """What the numbers are: windowing, and whether they cover the reference split."""
    s = f"seqlen {args.seqlen}, "
    s += f"first {args.max_windows} windows — PARTIAL" if args.max_windows else "full test split"
    if not data.get("is_reference_split"):
        s += f"; data is NOT the reference WikiText-2 test ({data['rows']} rows, sha256 {data['sha256'][:12]}…)"
    return s


def write_reports(args, models, bits_list, methods, results, failures, seconds, data: dict) -> dict:
    out = Path(args.output_dir) / "table"
    out.mkdir(parents=True, exist_ok=True)
    labels = column_labels(models)
    errors = {(f["model"], f["bits"], f["method"]): f["error"] for f in failures if f["metric"] == "ppl"}
    md = [f"# WikiText-2 perplexity ({table_subtitle(args, data)})", ""]
    rows = []
    for bits in bits_list:
        md += [f"## W-A-KV {bits}", "", "| Method | " + " | ".join(labels) + " |",
               "|---|" + "---:|" * len(labels)]
        for meth in methods:
            cells = []
            for m, label in zip(models, labels):
                r = results.get((m, bits, meth))
                status = r["status"] if r else "failed"
                ppl = r["ppl"] if r and status == "ok" else None
                cells.append(f"{ppl:.2f}" if ppl is not None else
                             f"**{r['ppl_value'] if status == 'nonfinite' else 'failed'}** ✗")
                le = (r or {}).get("lighteval") or {}
                rows.append({"model": label, "bits": bits, "method": meth, "ppl": ppl, "status": status,
                             "error": errors.get((m, bits, meth)),
                             "cached": r.get("cached") if r else None,
                             "seconds": round(r["cell_seconds"], 2) if r else None,
                             "result": r.get("result_path") if r else None,
                             "lighteval_average": le.get("average"), "lighteval_average_all": le.get("average_all"),
                             "lighteval_seconds": round(le["total_seconds"], 2) if le else None,
                             "lighteval_cached": le.get("cached"), "lighteval_result": le.get("result_path"),
                             **peak_columns(r, le)})
            md.append(f"| {ROW_NAMES.get(meth, meth)} | " + " | ".join(cells) + " |")
        md.append("")
    if len(set(labels)) == len(labels) and labels != [model_slug(m) for m in models]:
        md += ["Columns: " + "; ".join(f"{lab} = {m}" for lab, m in zip(labels, models)), ""]
    if args.tasks:
        md += _lighteval_md(args, labels, bits_list, methods, rows)
    md += _peak_md(labels, bits_list, methods, rows)
    compute = sum((r["seconds"] or 0.0) + (r["lighteval_seconds"] or 0.0) for r in rows)
    md += ["", f"Compute time of the grid: {compute:.1f} s (per cell: rotation training + quantization + evaluation, "
           "model loading excluded except in lighteval runs; cached cells count their original time). This invocation: "
           f"{seconds:.1f} s wall."]
    if failures:
        md += ["", f"## Failed cells ({len(failures)})", ""]
        md += [f"- {f['model']} {f['method']} {f['bits']} ({f['metric']}): {f['error']}" for f in failures]
    write_text_atomic(out / "table.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["model"])
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "table.csv", buf.getvalue())
    plot_table(out / "table.png", labels, bits_list, methods, rows, table_subtitle(args, data))
    summary = {"seconds": seconds, "compute_seconds": compute, "cells": len(rows),
               "computed": sum(1 for r in rows if r["cached"] is False),
               "lighteval_computed": sum(1 for r in rows if r["lighteval_cached"] is False),
               "failed": failures, "data": data, "files": [str(out / n) for n in ("table.md", "table.csv", "table.png")]}
    write_json_atomic(out / "summary.json", summary)
    return summary


PEAK = ("gpu_peak_allocated_gb", "gpu_peak_reserved_gb", "host_peak_rss_gb")


def peak_columns(r: dict | None, le: dict) -> dict:
    """A cell's peak memory (GiB) for the CSV: its PPL run's, and its lighteval run's where there is one."""
    ppl, lev = (r or {}).get("peak_memory") or {}, le.get("peak_memory") or {}
    return {**{k: ppl.get(k) for k in PEAK}, **{f"lighteval_{k}": lev.get(k) for k in PEAK},
            "streamed": ((r or {}).get("offload") or {}).get("streamed")}


def _grid_md(labels, bits_list, methods, rows, cell) -> list[str]:
    """One markdown table per bit setting, methods as rows, models as columns; `cell(row)` renders a cell."""
    md = []
    for bits in bits_list:
        md += [f"## W-A-KV {bits}", "", "| Method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for meth in methods:
            cells = [cell(next(x for x in rows if x["model"] == label and x["bits"] == bits and x["method"] == meth))
                     for label in labels]
            md.append(f"| {ROW_NAMES.get(meth, meth)} | " + " | ".join(cells) + " |")
        md.append("")
    return md


def _peak_md(labels, bits_list, methods, rows) -> list[str]:
    """The "Peak memory" section: GPU peak allocated / host peak RSS (GiB) of each cell's PPL run."""

    def cell(r):
        g, h = r["gpu_peak_allocated_gb"], r["host_peak_rss_gb"]
        return ("-" if g is None and h is None else
                f"{'-' if g is None else f'{g:.2f}'} / {'-' if h is None else f'{h:.2f}'}{' *' if r['streamed'] else ''}")

    return ["# Peak memory", "", "GPU peak allocated / host peak RSS in GiB of each cell's PPL run (quantization "
            "included; host RSS is the process's peak so far; * = layer-streamed; cached cells show their original "
            "run).", ""] + _grid_md(labels, bits_list, methods, rows, cell)


def pct(v) -> str:
    """A lighteval score (0..1) as a markdown table cell, in %."""
    return "-" if v is None else f"{100 * v:.2f}"


def _lighteval_md(args, slugs, bits_list, methods, rows) -> list[str]:
    """The lighteval section: per method and model, the average over exact-data benchmarks (and over all)."""
    md = [f"# Lighteval benchmarks ({args.tasks}" + (f", first {args.max_samples} docs per task" if args.max_samples
                                                      else ", full splits") + ")", "",
          "Average accuracy (%) over the benchmarks scored on exact data; in brackets, including the not-exact local "
          "copies. Per-task numbers: the lighteval_result files.", ""]
    return md + _grid_md(slugs, bits_list, methods, rows, lambda r: "failed" if r["lighteval_result"] is None else
                         f"{pct(r['lighteval_average'])} ({pct(r['lighteval_average_all'])})")


def table_figure(slugs: list[str], bits_list: list[str], methods: list[str], rows: list[dict], subtitle: str):
    """The PPL grid as a matplotlib Figure (Agg canvas): one subplot per bit setting, methods on x, a bar per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    cells = {(r["model"], r["bits"], r["method"]): r for r in rows}

    def ok(cell):
        return cell is not None and cell["status"] == "ok" and cell["ppl"] is not None

    # A plain Figure, not pyplot: no global backend switch, nothing left open for the caller to close.
    width_in = max(5, 1.6 * len(methods) * len(slugs) / 2 + 2) * len(bits_list)
    fig = Figure(figsize=(width_in, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(bits_list), squeeze=False)[0]
    width = 0.8 / max(1, len(slugs))
    for ax, bits in zip(axes, bits_list):
        # Markers sit at a data x but a fixed height above the axis floor, whatever the y range.
        floor = blended_transform_factory(ax.transData, ax.transAxes)
        for j, slug in enumerate(slugs):
            xs, ys = [], []
            for i, meth in enumerate(methods):
                x = i + (j - (len(slugs) - 1) / 2) * width
                cell = cells.get((slug, bits, meth))
                if ok(cell):
                    xs.append(x)
                    ys.append(cell["ppl"])
                    continue
                mark = {"nonfinite": "NaN"}.get(cell["status"], "failed") if cell else "missing"
                ax.text(x, 0.02, mark, transform=floor, rotation=90, color="red", fontsize=7,
                        ha="center", va="bottom")
            if xs:
                bars = ax.bar(xs, ys, width, color=f"C{j % 10}")
                ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7, padding=1)
        top = max((c["ppl"] for c in rows if c["bits"] == bits and ok(c)), default=None)
        ax.set_yscale("log")
        # PPL >= 1, so bars share the floor 1; the top leaves room above the tallest bar for its value label.
        ax.set_ylim(1, max(10, top ** 1.15 * 3) if top else 10)
        ax.set_xlim(-0.5, len(methods) - 0.5)  # every slot stays on the axis, even when its bars are missing
        ax.set_xticks(range(len(methods)), [ROW_NAMES.get(m, m) for m in methods], rotation=20, ha="right",
                      rotation_mode="anchor")
        ax.set_ylabel("WikiText-2 PPL (log)")
        ax.set_title(f"W-A-KV {bits}")
    # Only models with a bar somewhere get a legend entry; the others are named in the title instead.
    failed = [s for s in slugs if not any(ok(r) for r in rows if r["model"] == s)]
    handles = [Patch(color=f"C{j % 10}", label=s) for j, s in enumerate(slugs) if s not in failed]
    if handles:
        # "outside": constrained layout reserves the room below the subplots, so the legend covers no bars.
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8,
                   frameon=False)
    fig.suptitle(f"WikiText-2 perplexity, {subtitle}" + (f" — failed: {', '.join(failed)}" if failed else ""),
                 fontsize=10)
    return fig


def plot_table(path, slugs, bits_list, methods, rows, subtitle: str) -> None:
    """Write table_figure(...) as a PNG."""
    table_figure(slugs, bits_list, methods, rows, subtitle).savefig(path, dpi=120, bbox_inches="tight")


def _cmd(args) -> int:
    s = run_table(args)
    print((Path(args.output_dir) / "table" / "table.md").read_text())
    le = f", lighteval: {s['lighteval_computed']} computed" if args.tasks else ""
    print(f"{s['cells']} cells ({s['computed']} computed, {len(s['failed'])} failed{le}) in {s['seconds']:.1f}s; "
          f"files: {', '.join(s['files'])}")
    if s["failed"]:
        print(f"osp-eval: error: {len(s['failed'])} of {s['cells']} cells failed (listed above and in "
              f"{Path(args.output_dir) / 'table' / 'summary.json'})", file=sys.stderr)
        return 1
    return 0


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
    p.add_argument("--nsamples", type=positive_int, default=None, help="GPTQ calibration windows (default 128)")
    p.add_argument("--calib_seqlen", type=positive_int, default=None, help="GPTQ calibration window length (default 2048)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="WikiText-2 window length")
    p.add_argument("--kernels", choices=KERNELS, default=None,
                   help=KERNELS_HELP)
    add_offload_arg(p)
    p.add_argument("--cuda_graphs", action="store_true",
                   help="PPL: replay the forward as a CUDA graph (checked bit for bit first; changes no number)")
    p.add_argument("--compile", action="store_true",
                   help="PPL: the forward through torch.compile (float-rounding differences; cached apart)")
    p.add_argument("--batch_size", type=positive_int, default=4, help="PPL windows per forward")
    p.add_argument("--max_windows", type=positive_int, default=None, help="only the first N windows (partial numbers)")
    p.add_argument("--tasks", default=None,
                   help="also run these lighteval tasks for every cell (a tasks file such as tasks/tasks.txt, or "
                        "task|shots entries); GPTQ and SpinQuant rotations are reused, not recomputed")
    p.add_argument("--max_samples", type=positive_int, default=None, help="lighteval: docs per task (partial numbers)")
    p.add_argument("--lighteval_batch_size", type=positive_int, default=DEFAULT_BATCH, help="lighteval_ptq.py's --batch_size")
    p.add_argument("--max_length", type=positive_int, default=None, help="lighteval_ptq.py's --max_length")
    p.add_argument("--spinquant_steps", type=positive_int, default=100, help="rotation training steps (SpinQuant row)")
    p.add_argument("--spinquant_nsamples", type=positive_int, default=800, help="rotation training windows")
    p.add_argument("--spinquant_seqlen", type=positive_int, default=2048, help="rotation training window length")
    p.add_argument("--spinquant_recompute_rotations", action="store_true",
                   help="rotation training keeps no fp32 copy of the weights (same rotations; for large models)")
    p.set_defaults(func=lambda a: _cmd(_with_models(a)))


def _with_models(args):
    args.models = [args.model, *args.more_models]
    return args
