"""Time GPTQ (W4, the OSP protocol's settings) over a whole model: wall time, peak GPU memory, per-layer times.

  python benchmarks/bench_gptq.py                          # random OSP-1.4B-shaped Llama, bf16, GPU
  python benchmarks/bench_gptq.py --rotate_down_proj       # + the online down_proj Hadamard (R4)
  python benchmarks/bench_gptq.py --model PATH             # a real model (still random calibration ids)
  python benchmarks/bench_gptq.py --tiny                   # CPU smoke run
  python benchmarks/bench_gptq.py --kernels reference,triton   # both column loops, same process, same weights?

Calibration windows are random token ids: this measures time only. Goes through `quantize_` exactly as a
run does (activation quant off during calibration, the online Hadamard active). Writes a JSON record to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from osp_eval.apply import quantize_  # noqa: E402
from osp_eval.config import QuantConfig  # noqa: E402
from osp_eval.results import device_info, versions  # noqa: E402

from common import RESULTS, osp_1p4b_config  # noqa: E402


def llama_config(tiny: bool):
    return osp_1p4b_config(tiny)


def build_model(args, device, dtype):
    if args.model:
        from osp_eval.models import load_model

        return load_model(args.model, dtype=dtype, device=args.load_device or device)[0]
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(args.load_device or device):  # random init straight on the device: seconds, not minutes
        model = LlamaForCausalLM(llama_config(args.tiny)).to(dtype)
    model.config.architectures = ["LlamaForCausalLM"]
    return model.eval().requires_grad_(False)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder / hub id / .gguf (default: random OSP-1.4B shape)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer random model, for a CPU smoke run")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; tiny: 8)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; tiny: 128)")
    p.add_argument("--batch_size", type=int, default=None, help="windows per layer call (default: gptq's)")
    p.add_argument("--rotate_down_proj", action="store_true", help="online down_proj Hadamard (R4) during GPTQ")
    p.add_argument("--w_groupsize", type=int, default=-1)
    p.add_argument("--act_order", action="store_true")
    p.add_argument("--no_clip", action="store_true", help="skip the MSE clip search (the protocol uses it)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--load_device", default=None, help="where the model lives (cpu: layer-by-layer offload)")
    p.add_argument("--tag", default=None, help="suffix of the results file name")
    p.add_argument("--kernels", default="reference",
                   help="comma-separated GPTQ column-loop paths to time in turn (reference, triton, auto)")
    args = p.parse_args()

    if args.rotate_down_proj and importlib.util.find_spec("osp_eval.hadamard") is None:
        sys.exit("--rotate_down_proj needs osp_eval/hadamard.py (the online Hadamard), which this checkout "
                 "does not have yet")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    nsamples = args.nsamples or (8 if args.tiny else 128)
    seqlen = args.seqlen or (128 if args.tiny else 2048)

    name = "tiny" if args.tiny else (Path(args.model).name if args.model else "random-osp-1.4b")
    runs, first = [], None
    for kernels in args.kernels.split(","):
        t0 = time.perf_counter()
        model = build_model(args, device, dtype)  # the same weights for every path (seeded)
        build_seconds = time.perf_counter() - t0
        ids = torch.randint(0, model.config.vocab_size, (nsamples, seqlen),
                            generator=torch.Generator().manual_seed(0))
        extra = {"gptq_batch_size": args.batch_size} if args.batch_size else {}
        cfg = QuantConfig(w_bits=4, w_method="gptq", rotate_down_proj=args.rotate_down_proj, nsamples=nsamples,
                          calib_seqlen=seqlen, w_groupsize=args.w_groupsize, act_order=args.act_order,
                          static_groups=args.act_order and args.w_groupsize > 0, w_clip=not args.no_clip,
                          extra=extra, kernels=kernels)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        quantize_(model, cfg, ids, progress=True)
        sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        stats = getattr(model, "osp_gptq_stats", {})
        layer_s = stats.get("layer_seconds", [])
        weights = {k: v for k, v in model.state_dict().items() if k.endswith("proj.weight")}
        if first is None:
            first, same, maxdiff, frac = weights, None, None, None
        else:
            same = all(torch.equal(weights[k], first[k]) for k in first)
            maxdiff = max((weights[k].float() - first[k].float()).abs().max().item() for k in first)
            frac = sum((weights[k] != first[k]).sum().item() for k in first) / sum(v.numel() for v in first.values())
        print(f"GPTQ W4 {name} kernels={kernels}: {nsamples}x{seqlen} tokens, {len(layer_s)} layers, "
              f"rotate_down_proj={args.rotate_down_proj}: {seconds:.1f} s (build {build_seconds:.1f} s), per layer "
              f"{sum(layer_s) / max(1, len(layer_s)):.2f} s, batch {stats.get('batch_size')}, offload "
              f"{stats.get('offload')}, peak GPU memory {peak if peak is None else f'{peak:.2f} GiB'}"
              + ("" if same is None else f", weights identical to the first path: {same} (max |diff| {maxdiff:g}, "
                 f"{frac:.2e} of the weights differ)"))
        runs.append({"kernels": kernels, "config": cfg.to_dict(), "seconds": seconds, "build_seconds": build_seconds,
                     "peak_gpu_gib": peak, "gptq_stats": stats, "identical_to_first": same,
                     "max_abs_diff_to_first": maxdiff,
                     "fraction_differing_from_first": frac})
        del model, weights
    record = {
        "benchmark": "gptq", "model": name, "nsamples": nsamples, "seqlen": seqlen, "dtype": str(dtype),
        "device_used": device, "load_device": args.load_device or device, "runs": runs,
        "seconds": runs[0]["seconds"], "command": " ".join(sys.argv), "versions": versions(), "device": device_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    tag = "_".join(x for x in (name, device, "had" if args.rotate_down_proj else "", args.tag or "") if x)
    path = RESULTS / f"bench_gptq_{tag}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
