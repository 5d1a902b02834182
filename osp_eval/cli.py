"""`osp-eval`: a thin command line over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .cli_args import (Parser, add_devices_arg, add_model_args, add_offload_arg, add_quant_args, config_from_args,
                       positive_int)
from .errors import OspEvalError


def _ppl(args) -> int:
    from .pipeline import evaluate_ppl, nonfinite_reason, save_ppl

    cfg = config_from_args(args, default_method="gptq")
    r = evaluate_ppl(args.model, cfg, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
                     data_dir=args.data_dir, seqlen=args.seqlen, batch_size=args.batch_size,
                     max_windows=args.max_windows, output_dir=args.output_dir, progress=not args.no_progress,
                     save_qmodel_path=args.save_qmodel_path, load_qmodel_path=args.load_qmodel_path,
                     backend=args.backend, offload=args.offload, devices=args.devices,
                     cuda_graphs=args.cuda_graphs, compile=args.compile)
    part = "" if r["all_windows"] else f" (first {r['nwindows']} of {r['windows_available']} windows)"
    if not r["data"]["is_reference_split"]:
        part += (f" (NOT the reference WikiText-2 test split: {r['data']['rows']} rows, sha256 "
                 f"{r['data']['sha256'][:12]}…)")
    value = f"{r['ppl']:.4f}" if r["ppl_finite"] else f"{r['ppl_value']} (NOT FINITE)"
    # The number is printed before anything is written: a failing disk never loses it.
    streamed = ", layer-streamed" if r["offload"]["streamed"] else ""
    print(f"{r['method']} W{cfg.w_bits}A{cfg.a_bits}KV{cfg.k_bits} {r['model']}: wikitext2 ppl = {value}"
          f"{part} [{r['tokens']} tokens, {r['eval_seconds']:.1f}s eval, {r['quantize_seconds']:.1f}s quantize"
          f"{streamed}]", flush=True)
    save_ppl(r)
    print(f"result: {r['result_path']}")
    if not r["ppl_finite"]:
        print(f"osp-eval: error: {nonfinite_reason(r)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="osp-eval", description="Fake-quantize a causal LM and measure what 4-bit does")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("ppl", help="WikiText-2 test perplexity (the reference protocol)")
    add_model_args(pp)
    add_quant_args(pp)
    add_devices_arg(pp)
    pp.add_argument("--seqlen", type=positive_int, default=2048)
    pp.add_argument("--batch_size", type=positive_int, default=4)
    pp.add_argument("--max_windows", type=positive_int, default=None,
                    help="evaluate only the first N windows (smoke tests)")
    pp.add_argument("--cuda_graphs", action="store_true",
                    help="replay the forward as a CUDA graph (checked bit for bit against the eager forward first; "
                         "changes no number)")
    pp.add_argument("--compile", action="store_true",
                    help="run the forward through torch.compile (fuses norms/RoPE; values differ from eager by float "
                         "rounding, so compiled results are cached apart)")
    pp.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                    help="score windows with Transformers (hf) or a vLLM engine (vllm; quantization is the same)")
    add_offload_arg(pp)
    pp.set_defaults(func=_ppl)
    from . import kurtosis, lighteval_cli, outliers, spinquant, table

    for module in (table, kurtosis, outliers, lighteval_cli, spinquant):
        module.add_cli(sub)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run(func, args) -> int:
    """Run a CLI action: user errors become one line on stderr and exit code 2; an unexpected failure is one
    line and exit code 1 (OSP_EVAL_TRACEBACK=1 prints the traceback, for bug reports)."""
    if getattr(args, "no_progress", False):
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        code = func(args)
    except OspEvalError as e:
        if os.environ.get("OSP_EVAL_TRACEBACK"):  # for bug reports: the full chain behind the one-line error
            traceback.print_exc()
        print(f"osp-eval: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("osp-eval: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:
        print(f"osp-eval: error: out of host memory ({_one_line(e)}): use a smaller model, --batch_size or "
              "--dtype bfloat16", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an environment failure: still one line, the traceback on request
        if os.environ.get("OSP_EVAL_TRACEBACK"):
            traceback.print_exc()
        oom = type(e).__name__ == "OutOfMemoryError"
        hint = ("out of GPU memory: lower --batch_size or use a smaller --dtype" if oom else
                "unexpected failure; rerun with OSP_EVAL_TRACEBACK=1 for the traceback and report it")
        print(f"osp-eval: error: {type(e).__name__}: {_one_line(e)[:300]} ({hint})", file=sys.stderr)
        return 1
    return code or 0


def main(argv: list[str] | None = None) -> int:
    from .provenance import set_command

    set_command(["osp-eval", *(sys.argv[1:] if argv is None else argv)])
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
