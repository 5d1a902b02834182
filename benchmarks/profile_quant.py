"""Where the time of fake-quantized evaluation and of GPTQ goes: torch.profiler tables (CUDA kernels and CPU ops
by total time) for the random OSP-1.4B shape, to plan the next speed work.

  python benchmarks/profile_quant.py [--layers 4] [--kernels auto] [--parts eval,gptq,spinquant] [--out DIR]

Prints the tables and writes them (text) and a JSON summary to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, osp_1p4b_config, random_model  # noqa: E402

from osp_eval import QuantConfig, quantize_  # noqa: E402
from osp_eval.results import device_info, versions  # noqa: E402


def table(prof, sort: str, n: int) -> str:
    return prof.key_averages().table(sort_by=sort, row_limit=n, max_name_column_width=70)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 1.4B shape kept")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--parts", default="eval,gptq,spinquant", help="comma list of eval, gptq, spinquant")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = osp_1p4b_config(args.tiny)
    config.num_hidden_layers = min(args.layers, config.num_hidden_layers)
    seqlen, bs = (2048, 4) if cuda else (64, 2)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ids = torch.randint(0, config.vocab_size, (bs, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    out, summary = [], {"layers": config.num_hidden_layers, "kernels": args.kernels, "tokens_per_forward": bs * seqlen}

    rows = {"fp": QuantConfig(kernels=args.kernels),
            "rtn_w4a4kv4": QuantConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", kernels=args.kernels),
            "ffn_had_w4a4kv4": QuantConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn",
                                           rotate_down_proj=True, kernels=args.kernels)}
    parts = set(args.parts.split(","))
    for name, cfg in rows.items() if "eval" in parts else ():
        model = random_model(config, dtype, device)
        quantize_(model, cfg, progress=False)
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=ids, use_cache=False)  # warm-up (Triton compile, autotune, allocator)
            with Timer() as t:
                for _ in range(3):
                    model(input_ids=ids, use_cache=False)
            with profile(activities=acts) as prof:
                model(input_ids=ids, use_cache=False)
                if cuda:
                    torch.cuda.synchronize()
        summary[name] = {"seconds_per_forward": t.seconds / 3, "tokens_per_second": 3 * bs * seqlen / t.seconds}
        out.append(f"== eval {name}: {t.seconds / 3 * 1e3:.1f} ms per forward of {bs}x{seqlen} tokens "
                   f"({summary[name]['tokens_per_second']:.0f} tok/s)\n" + table(prof, sort, 25))
        del model

    if "gptq" in parts:
        model = random_model(config, dtype, device)
        calib = torch.randint(0, config.vocab_size, (32 if cuda else 4, seqlen),
                              generator=torch.Generator().manual_seed(1))
        cfg = QuantConfig(w_bits=4, w_method="gptq", nsamples=len(calib), calib_seqlen=seqlen, kernels=args.kernels)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            quantize_(model, cfg, calib, progress=False)
            summary["gptq_seconds"] = time.perf_counter() - t0
        out.append(f"== GPTQ W4 (clip search), {len(calib)}x{seqlen} calibration, {config.num_hidden_layers} layers: "
                   f"{summary['gptq_seconds']:.1f} s (profiled)\n" + table(prof, sort, 30))
        del model
    if "spinquant" in parts:  # one optimizer step of 8 windows (micro-batch 8), as bench_spinquant times it
        from osp_eval.config import preset
        from osp_eval.spinquant import prepare_training_model, train_rotations

        model = random_model(config, dtype, device)
        cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq", kernels=args.kernels)
        rot = prepare_training_model(model, cfg)
        win = torch.randint(0, config.vocab_size, (16, seqlen), generator=torch.Generator().manual_seed(2))
        train_rotations(model, rot, win[:8], steps=1, progress=False)  # warm-up
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            train_rotations(model, rot, win[8:], steps=1, progress=False)
            if cuda:
                torch.cuda.synchronize()
            summary["spinquant_step_seconds"] = time.perf_counter() - t0
        out.append(f"== SpinQuant step (8x{seqlen}, checkpointing), {config.num_hidden_layers} layers: "
                   f"{summary['spinquant_step_seconds']:.2f} s (profiled)\n" + table(prof, sort, 30))
    text = "\n\n".join(out)
    print(text)
    dst = Path(args.out)
    dst.mkdir(parents=True, exist_ok=True)
    stem = f"profile_quant_{'cuda' if cuda else 'cpu'}"
    (dst / f"{stem}.txt").write_text(text + "\n")
    summary |= {"versions": versions(), "device": device_info(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (dst / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("versions", "device")}, indent=1))


if __name__ == "__main__":
    main()
