"""`osp-eval lighteval` and lighteval_ptq.py / lighteval_ptq_vllm.py: flags, then `lighteval_run.run_lighteval`."""

from __future__ import annotations

import argparse
import os

from .errors import OspEvalError
from .lighteval_run import (DEFAULT_BATCH, REPO_TASKS, VLLM_LOGLIK_BACKEND, check_data_parallel, dist_backend,
                            format_table, lighteval_plan, parse_tasks, run_lighteval)


def add_lighteval_args(p: argparse.ArgumentParser) -> None:
    from .cli_args import add_devices_arg, add_model_args, add_quant_args, positive_int

    add_model_args(p)
    add_quant_args(p)
    add_devices_arg(p)
    g = p.add_argument_group("lighteval")
    g.add_argument("--tasks", default=str(REPO_TASKS),
                   help="tasks file (lines suite|task|shots|truncate) or comma-separated task|shots entries")
    g.add_argument("--no_rtn", action="store_true",
                   help="weights by GPTQ instead of RTN (the reference's lighteval script runs RTN unless --no_rtn; "
                        "its other weight path is GPTQ). For unquantized weights use --w_bits 16")
    g.add_argument("--max_samples", type=positive_int, default=None, help="evaluate only N docs per task (partial numbers)")
    g.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH,
                   help="log-likelihood passes hold up to batch_size x max_length tokens (more rows when short); "
                        "generation runs batch_size prompts at a time (see --gen_batch_size)")
    g.add_argument("--gen_batch_size", type=positive_int, default=None,
                   help="prompts per generate() call for GSM8K/TriviaQA (default: --batch_size); on a GPU a few "
                        "hundred keeps the decode loop busier")
    g.add_argument("--max_length", type=positive_int, default=None, help="default: min(2048, the model's max positions)")
    g.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="vllm: generation (and log-likelihoods with --loglik_backend vllm) in an in-process vLLM "
                        "engine holding the same quantized model; lighteval_ptq_vllm.py is this flag's shortcut")
    g.add_argument("--loglik_backend", choices=["hf", "vllm"], default=None,
                   help=f"with --backend vllm: who scores the multiple-choice tasks (default {VLLM_LOGLIK_BACKEND}, "
                        "the faster one measured on an H100; see benchmarks/RESULTS.md)")
    g.add_argument("--save_details", action="store_true", help="also write lighteval's per-sample details")
    g.add_argument("--data_parallel", type=positive_int, default=1, metavar="N",
                   help="N processes, one model replica each (one GPU each, or the CPU), each scoring a share of "
                        "the documents; same numbers as one process. Under torchrun leave it at 1")


def weight_method(args) -> str:
    if args.no_rtn and (args.w_rtn or args.w_method == "rtn"):
        raise OspEvalError("--no_rtn contradicts --w_rtn / --w_method rtn")
    return "gptq" if args.no_rtn else "rtn"


def action(args) -> None:
    from .cli_args import config_from_args
    from .parallel import launch

    cfg = config_from_args(args, default_method=weight_method(args))
    if args.data_parallel > 1:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise OspEvalError(f"--data_parallel {args.data_parallel} under torchrun: torchrun already starts the "
                               "processes; drop one of them")
        check_data_parallel(args.data_parallel, args.device, args.devices)
        # Bad input fails here, once, before N processes start (each would import lighteval and load the model).
        lighteval_plan(args.model, cfg, parse_tasks(args.tasks), gguf_file=args.gguf_file, dtype=args.dtype,
                       device=args.device, data_dir=args.data_dir, max_samples=args.max_samples,
                       batch_size=args.batch_size, max_length=args.max_length, output_dir=args.output_dir,
                       load_qmodel_path=args.load_qmodel_path, backend=args.backend,
                       gen_batch_size=args.gen_batch_size, loglik_backend=args.loglik_backend)
    launch(_run_and_print, args.data_parallel, args, cfg, backend=dist_backend(args.device))


def _run_and_print(args, cfg) -> None:
    from .parallel import world

    r = run_lighteval(args.model, cfg, tasks=args.tasks, gguf_file=args.gguf_file, dtype=args.dtype,
                      device=args.device, data_dir=args.data_dir, max_samples=args.max_samples,
                      batch_size=args.batch_size, max_length=args.max_length, output_dir=args.output_dir,
                      save_details=args.save_details, progress=not args.no_progress,
                      save_qmodel_path=args.save_qmodel_path, load_qmodel_path=args.load_qmodel_path,
                      backend=args.backend, gen_batch_size=args.gen_batch_size, loglik_backend=args.loglik_backend,
                      devices=args.devices)
    if world().main:
        print(format_table(r))


def build_parser(prog: str = "lighteval_ptq.py") -> argparse.ArgumentParser:
    from .cli_args import Parser

    p = Parser(prog=prog, description="Fake-quantize a model and run the OSP lighteval benchmarks")
    add_lighteval_args(p)
    p.set_defaults(func=action)
    return p


def add_cli(subparsers) -> None:
    """Register `osp-eval lighteval ...` (same flags as lighteval_ptq.py)."""
    p = subparsers.add_parser("lighteval", help="the OSP lighteval benchmarks on a fake-quantized model")
    add_lighteval_args(p)
    p.set_defaults(func=action)
