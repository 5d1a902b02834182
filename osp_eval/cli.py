"""`osp-eval`: a thin command line over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .cli_args import add_model_args, add_quant_args, config_from_args
from .errors import OspEvalError


def _ppl(args) -> None:
    from .pipeline import run_ppl

    cfg = config_from_args(args, default_method="gptq")
    r = run_ppl(args.model, cfg, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
                data_dir=args.data_dir, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                output_dir=args.output_dir, progress=not args.no_progress, save_qmodel_path=args.save_qmodel_path,
                load_qmodel_path=args.load_qmodel_path, backend=args.backend)
    part = "" if r["full_split"] else f" (first {r['nwindows']} of {r['windows_available']} windows)"
    print(f"{r['method']} W{cfg.w_bits}A{cfg.a_bits}KV{cfg.k_bits} {r['model']}: wikitext2 ppl = {r['ppl']:.4f}"
          f"{part} [{r['tokens']} tokens, {r['eval_seconds']:.1f}s eval, {r['quantize_seconds']:.1f}s quantize]")
    print(f"result: {r['result_path']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp-eval", description="Fake-quantize a causal LM and measure what 4-bit does")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("ppl", help="WikiText-2 test perplexity (the reference protocol)")
    add_model_args(pp)
    add_quant_args(pp)
    pp.add_argument("--seqlen", type=int, default=2048)
    pp.add_argument("--batch_size", type=int, default=4)
    pp.add_argument("--max_windows", type=int, default=None, help="evaluate only the first N windows (smoke tests)")
    pp.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                    help="score windows with Transformers (hf) or a vLLM engine (vllm; quantization is the same)")
    pp.set_defaults(func=_ppl)
    from . import kurtosis, lighteval_run, outliers, table

    for module in (table, kurtosis, outliers, lighteval_run):
        module.add_cli(sub)
    try:  # rotation training may not be present in every checkout
        from . import spinquant
    except ImportError:
        spinquant = None
    if spinquant is not None and hasattr(spinquant, "add_cli"):
        spinquant.add_cli(sub)
    return p


def run(func, args) -> int:
    """Run a CLI action: user errors become one line on stderr and exit code 2."""
    if getattr(args, "no_progress", False):
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        func(args)
    except OspEvalError as e:
        if os.environ.get("OSP_EVAL_TRACEBACK"):  # for bug reports: the full chain behind the one-line error
            traceback.print_exc()
        print(f"osp-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("osp-eval: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
