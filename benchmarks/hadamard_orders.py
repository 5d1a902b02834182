"""Which Hadamard orders osp_eval.hadamard can build: every multiple of 4 below a limit.

For each order K it prints the construction of H_K (Sylvester, Paley I/II with q, Williamson,
Kronecker a×b; "original" marks the K of the original fixed list, which keep their
construction), builds it (osp_eval checks H H^T = K I exactly) and times that, then lists the
orders without a construction.  The same goes to benchmarks/logs/hadamard_orders.json.

Usage:  python benchmarks/hadamard_orders.py [--limit 1000]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from osp_eval import hadamard

LOG = Path(__file__).resolve().parent / "logs" / "hadamard_orders.json"


def describe(k: int) -> str | None:
    how = hadamard._construction(k)
    if how is None:
        return None
    kind, *args = how
    if kind == "sylvester":
        text = f"Sylvester 2^{k.bit_length() - 1}"
    elif kind in ("paley1", "paley2"):
        q = args[0]
        p, m = hadamard._prime_power(q)
        text = f"Paley {'I' if kind == 'paley1' else 'II'} q={q}" + (f"={p}^{m}" if m > 1 else "")
    elif kind == "williamson":
        text = f"Williamson n={args[0]} (4·{args[0]})"
    else:
        text = f"Kronecker {args[0]}×{args[1]}"
    return text + (" (original)" if k in hadamard.K_ORDER else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1000, help="orders below this (default 1000)")
    args = ap.parse_args()

    orders, seconds = {}, {}
    for k in range(4, args.limit, 4):
        orders[k] = describe(k)
        if orders[k] is not None:
            t = time.perf_counter()
            hadamard._base_matrix(k)  # raises if H H^T != K I
            seconds[k] = round(time.perf_counter() - t, 4)
        print(f"{k:5d}  {orders[k] or 'none'}" + (f"  ({seconds[k]:.3f} s)" if k in seconds else ""))

    unsupported = [k for k, d in orders.items() if d is None]
    counts = collections.Counter((hadamard._construction(k) or ("none",))[0] for k in orders)
    print(f"\n{len(unsupported)} of {len(orders)} multiples of 4 below {args.limit} have no construction:")
    print(", ".join(map(str, unsupported)))
    print("counts:", dict(counts))

    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text(json.dumps({"limit": args.limit, "orders": orders, "unsupported": unsupported,
                               "counts": dict(counts), "build_seconds": seconds}, indent=1, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    print(f"wrote {LOG}")


if __name__ == "__main__":
    main()
