"""Combine lighteval_ptq.py summaries into one markdown table: tasks as rows, configurations as columns.

  python benchmarks/lighteval_table.py RESULTS_DIR [RESULTS_DIR ...] [--out table.md]

A configuration may have been evaluated in several runs (e.g. the log-likelihood tasks in one, the generative
ones in another, to fit a time limit): runs with the same method, bits, model and --max_samples are merged per task, and the
benchmark averages are recomputed from the merged tasks with osp_eval's own rule. Times are summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osp_eval.lighteval_run import benchmarks  # noqa: E402
from osp_eval.lighteval_tasks import BENCHMARK  # noqa: E402


def load(paths: list[str]) -> dict:
    configs: dict[tuple, dict] = {}
    for root in paths:
        for f in sorted(Path(root).rglob("*.json")):
            r = json.loads(f.read_text())
            if r.get("kind") != "lighteval":
                continue
            key = (r["model"], r["method"], r["bits"], r.get("max_samples"))
            c = configs.setdefault(key, {"tasks": {}, "eval_seconds": 0.0, "total_seconds": 0.0, "runs": 0,
                                         "full_splits": True, "device": r.get("device")})
            c["tasks"].update(r["tasks"])
            c["eval_seconds"] += r["eval_seconds"]
            c["total_seconds"] += r["total_seconds"]
            c["runs"] += 1
            c["full_splits"] &= bool(r["full_splits"])
    for c in configs.values():
        c.update(benchmarks(c["tasks"]))
    return configs


def markdown(configs: dict) -> str:
    order = ["fp", "rtn", "ffn_had", "gptq", "quarot_rtn", "quarot", "spinquant"]
    keys = sorted(configs, key=lambda k: (k[3] is not None, order.index(k[1]) if k[1] in order else 99, k))
    tasks = sorted({t for c in configs.values() for t in c["tasks"]}, key=lambda t: (BENCHMARK[t], t))
    head = [f"{m} {b}" + (f" ({n}/task)" if n else "") for _, m, b, n in keys]
    out = ["| task | metric | docs in split | " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(keys)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for t in tasks:
        any_c = next(c for c in configs.values() if t in c["tasks"])
        info = any_c["tasks"][t]
        flag = " (not exact)" if info["not_exact"] else ""
        vals = [pct(configs[k]["tasks"].get(t, {}).get("value")) for k in keys]
        out.append(f"| {t}{flag} | {info['metric']} | {info['n_available']} | " + " | ".join(vals) + " |")
    out.append("| **average, exact data** | | | " + " | ".join(f"**{pct(configs[k]['average'])}**" for k in keys)
               + " |")
    out.append("| average incl. not-exact | | | " + " | ".join(pct(configs[k]["average_all"]) for k in keys) + " |")
    out.append("| evaluation time (s) | | | " + " | ".join(f"{configs[k]['eval_seconds']:.0f}" for k in keys) + " |")
    out.append("| total time incl. load + quantize (s) | | | "
               + " | ".join(f"{configs[k]['total_seconds']:.0f}" for k in keys) + " |")
    over = configs[keys[0]]["average_over"] if keys else []
    out += ["", f"Exact average over {len(over)} benchmarks: {', '.join(over)} (ARC = mean of easy and challenge)."]
    if not all(c["full_splits"] for c in configs.values()):
        out.append("PARTIAL: some runs used --max_samples.")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    configs = load(args.dirs)
    if not configs:
        sys.exit(f"no lighteval summaries under {', '.join(args.dirs)}")
    md = markdown(configs)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
