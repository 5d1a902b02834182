"""Combine lighteval_ptq.py / lighteval_ptq_vllm.py summaries into one markdown table: tasks as rows,
configurations as columns.

  python benchmarks/lighteval_table.py RESULTS_DIR [RESULTS_DIR ...] [--out table.md]

A configuration may have been evaluated in several runs (e.g. the log-likelihood tasks in one, the generative
ones in another, to fit a time limit): runs with the same method, bits, model and --max_samples are merged per task,
and the benchmark averages are recomputed from the merged tasks with osp_eval's own rule. When a task was run by
both backends, the Transformers path's score is used (it is the reference's path); a score that comes from vLLM is
marked with a dagger. Times are the sums over the runs whose scores are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osp_eval.lighteval_run import benchmarks  # noqa: E402
from osp_eval.lighteval_tasks import BENCHMARK, MAIN_METRIC  # noqa: E402
from osp_eval.table import pct  # noqa: E402

GENERATIVE_METRICS = {"qem"}  # GSM8K and TriviaQA: scored by quasi-exact match on generated text


def task_backend(r: dict, task: str) -> str:
    """Which backend scored `task` in summary `r` (summaries before the per-type split have only "backend")."""
    kind = "generation" if MAIN_METRIC[task] in GENERATIVE_METRICS else "loglikelihood"
    return r.get("backends", {}).get(kind, r.get("backend", "hf"))


def load(paths: list[str]) -> dict:
    runs: dict[tuple, list] = {}
    for root in paths:
        for f in sorted(Path(root).rglob("*.json")):
            r = json.loads(f.read_text())
            if r.get("kind") == "lighteval":
                runs.setdefault((r["model"], r["method"], r["bits"], r.get("max_samples")), []).append(r)
    configs = {}
    for key, rs in runs.items():
        chosen = {}  # task -> the run whose score is used (the Transformers path first)
        for r in sorted(rs, key=lambda r: r.get("backend", "hf") != "hf"):
            for t in r["tasks"]:
                chosen.setdefault(t, r)
        used = {id(r): r for r in chosen.values()}.values()
        c = {"tasks": {t: {**r["tasks"][t], "backend": task_backend(r, t)} for t, r in chosen.items()},
             "eval_seconds": sum(r["eval_seconds"] for r in used),
             "total_seconds": sum(r["total_seconds"] for r in used),
             "full_splits": all(r["full_splits"] for r in used), "device": rs[0].get("device")}
        c.update(benchmarks(c["tasks"]))
        configs[key] = c
    return configs


def markdown(configs: dict) -> str:
    order = ["fp", "rtn", "ffn_had", "gptq", "quarot_rtn", "quarot", "spinquant"]
    keys = sorted(configs, key=lambda k: (k[3] is not None, order.index(k[1]) if k[1] in order else 99, k))
    tasks = sorted({t for c in configs.values() for t in c["tasks"]}, key=lambda t: (BENCHMARK[t], t))
    several = len({k[0] for k in keys}) > 1
    head = [(f"{Path(mod).name}: " if several else "") + f"{m} {b}" + (f" ({n}/task)" if n else "")
            for mod, m, b, n in keys]
    out = ["| task | metric | docs in split | " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(keys)]

    for t in tasks:
        any_c = next(c for c in configs.values() if t in c["tasks"])
        info = any_c["tasks"][t]
        flag = " (not exact)" if info["not_exact"] else ""
        vals = [pct(configs[k]["tasks"].get(t, {}).get("value"))
                + (" †" if configs[k]["tasks"].get(t, {}).get("backend") == "vllm" else "") for k in keys]
        out.append(f"| {t}{flag} | {info['metric']} | {info['n_available']} | " + " | ".join(vals) + " |")
    out.append("| **average, exact data** | | | " + " | ".join(f"**{pct(configs[k]['average'])}**" for k in keys)
               + " |")
    out.append("| average incl. not-exact | | | " + " | ".join(pct(configs[k]["average_all"]) for k in keys) + " |")
    out.append("| evaluation time (s) | | | " + " | ".join(f"{configs[k]['eval_seconds']:.0f}" for k in keys) + " |")
    out.append("| total time incl. load + quantize (s) | | | "
               + " | ".join(f"{configs[k]['total_seconds']:.0f}" for k in keys) + " |")
    over = configs[keys[0]]["average_over"] if keys else []
    out += ["", f"Exact average over {len(over)} benchmarks: {', '.join(over)} (ARC = mean of easy and challenge)."]
    if any(t.get("backend") == "vllm" for c in configs.values() for t in c["tasks"].values()):
        out.append("† scored through the vLLM path (lighteval_ptq_vllm.py), the others through Transformers.")
    if not all(c["full_splits"] for c in configs.values()):
        out.append("PARTIAL: some runs used --max_samples.")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out", default=None)
    p.add_argument("--full", action="store_true", help="only configurations evaluated on the full splits")
    args = p.parse_args()
    configs = {k: c for k, c in load(args.dirs).items() if not (args.full and k[3] is not None)}
    if not configs:
        sys.exit(f"no lighteval summaries under {', '.join(args.dirs)}")
    md = markdown(configs)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
