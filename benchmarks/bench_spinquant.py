"""Time SpinQuant rotation training steps (W16A4KV4, the GPTQ-follows recipe): seconds per optimizer step of
8 windows × seqlen, for several micro-batch sizes, and peak GPU memory.

  python benchmarks/bench_spinquant.py --model PATH               # a real model (e.g. SmolLM2-135M)
  python benchmarks/bench_spinquant.py                            # random OSP-1.4B-shaped Llama, bf16, GPU
  python benchmarks/bench_spinquant.py --tiny --seqlen 64         # CPU smoke run

Token ids are random (time only). The first step of each setting is a warm-up and is not counted.
Writes a JSON record to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from osp_eval.config import preset  # noqa: E402
from osp_eval.spinquant import prepare_training_model, train_rotations  # noqa: E402

from common import osp_1p4b_config, random_model, save, sync  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder / .gguf (default: random OSP-1.4B shape)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--micro_batch_sizes", default="8,1")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--no_checkpointing", action="store_true")
    p.add_argument("--kernels", default="reference",
                   help="comma list of reference|triton|auto: each setting is trained from the same start per path "
                        "(triton: the activation/K/V quantizers' forward and backward run as Triton kernels and, on "
                        "a GPU, the R1 weight rotations as split-TF32 GEMMs; the gradient and rotated weights up to "
                        "fp32 rounding: expect close losses)")
    args = p.parse_args()
    paths = [k.strip() for k in args.kernels.split(",") if k.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = Path(args.model).name if args.model else "random-osp-1.4b" + ("-tiny" if args.tiny else "")

    def training_model(path):
        # A fresh model per path: the rotation GEMMs (split TF32 or fp32) are chosen when the model is prepared.
        if args.model:
            from osp_eval.models import load_model

            model = load_model(args.model, dtype=dtype, device=device)[0]
        else:
            model = random_model(osp_1p4b_config(args.tiny), dtype, device)  # seeded: the same weights every time
        return model, prepare_training_model(model, cfg.replace(kernels=path))

    cfg = preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq")
    rows = []
    settings = [(int(x), path) for x in args.micro_batch_sizes.split(",") for path in paths]
    model = ids = None
    for mbs, path in settings:
        del model
        model, rot = training_model(path)  # every setting trains from the same rotations: losses comparable
        if ids is None:
            ids = torch.randint(0, model.config.vocab_size, (args.batch_size * (args.steps + 1), args.seqlen),
                                generator=torch.Generator().manual_seed(0))
        kw = dict(batch_size=args.batch_size, micro_batch_size=mbs, checkpointing=not args.no_checkpointing,
                  progress=False)
        train_rotations(model, rot, ids[:args.batch_size], steps=1, **kw)  # warm-up
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        losses = train_rotations(model, rot, ids[args.batch_size:], steps=args.steps, **kw)
        sync()
        sec = (time.perf_counter() - t0) / args.steps
        same = next((r for r in rows if r["micro_batch_size"] == mbs), None)
        row = {"micro_batch_size": mbs, "kernels": path, "seconds_per_step": sec, "losses": losses,
               "max_abs_loss_diff_vs_first_path": (max(abs(a - b) for a, b in zip(losses, same["losses"]))
                                                   if same else 0.0),
               "tokens_per_second": args.batch_size * args.seqlen / sec,
               "est_100_steps_seconds": 100 * sec}
        if device == "cuda":
            row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(f"{name}: micro-batch {mbs} {path}: {sec:.3f} s/step ({row['tokens_per_second']:.0f} tok/s), "
              f"100 steps ≈ {100 * sec:.0f} s" + (f", peak {row['peak_gpu_memory_gb']:.1f} GiB" if device == "cuda"
                                                  else ""))
    save(f"bench_spinquant_{name}_{device}", {"model": name, "dtype": str(dtype), "seqlen": args.seqlen,
                                              "batch_size": args.batch_size, "config": cfg.to_dict(),
                                              "checkpointing": not args.no_checkpointing, "rows": rows})


if __name__ == "__main__":
    main()
