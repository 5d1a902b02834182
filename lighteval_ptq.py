#!/usr/bin/env python
"""Fake-quantize a model in memory and run the OSP lighteval benchmarks (the reference's lighteval_ptq.py).

    python lighteval_ptq.py MODEL --w_bits 4 --a_bits 4 --kv_bits 4 [--rotate | --rotate_down_proj] [--no_rtn] \\
        --tasks tasks/tasks.txt [--max_samples N] [--batch_size B] [--output_dir DIR] [--save_details]

See `python lighteval_ptq.py --help` and osp_eval/lighteval_run.py.
"""

import sys

from osp_eval.cli import run
from osp_eval.lighteval_cli import build_parser

if __name__ == "__main__":
    args = build_parser().parse_args()
    sys.exit(run(args.func, args))
