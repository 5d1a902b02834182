"""Where vLLM spends time when it scores prompts (the lighteval log-likelihood path): the engine's forward vs the
Python that turns prompt log-probs into per-position objects, with and without detokenization.

  python benchmarks/bench_vllm_scoring.py [--prompts 256] [--length 120]   # SmolLM2-135M, CPU or GPU

Under cProfile, the output processor's prompt-log-prob step (`_update_prompt_logprobs`) is timed per prompt
position; the model-runner side (`_get_prompt_logprobs_dict`, which includes the lm_head and log_softmax) and the
whole call are reported too. cProfile inflates Python-heavy code, so the per-position numbers are upper bounds;
their ratio is what matters. Random token prompts: only the cost is measured.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save  # noqa: E402


def cumulative(stats: pstats.Stats, func_name: str) -> float:
    return sum(v[3] for k, v in stats.stats.items() if k[2] == func_name)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--length", type=int, default=120)
    args = p.parse_args()

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from osp_eval.models import load_model, smollm2_gguf_path
    from osp_eval.vllm_backend import VllmEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(smollm2_gguf_path(), dtype=torch.float32 if device == "cpu" else torch.bfloat16,
                            device=device)
    engine = VllmEngine(model, tok, max_model_len=args.length + 1)
    g = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 40000, (args.length,), generator=g).tolist())
               for _ in range(args.prompts)]
    positions = args.prompts * (args.length - 1)
    engine.llm.generate(prompts[:8], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)  # warm-up
    rows = {}
    for detok in (True, False):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        engine.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=detok),
                            use_tqdm=False)
        prof.disable()
        wall = time.perf_counter() - t0
        st = pstats.Stats(prof)
        out_s = cumulative(st, "_update_prompt_logprobs")
        rows[f"detokenize={detok}"] = {
            "wall_s_profiled": wall, "output_processing_s": out_s,
            "output_processing_us_per_position": 1e6 * out_s / positions,
            "model_runner_prompt_logprobs_s": cumulative(st, "_get_prompt_logprobs_dict"),
        }
        r = rows[f"detokenize={detok}"]
        print(f"detokenize={detok!s:5}: whole call {wall:6.2f} s (profiled); prompt-log-prob output processing "
              f"{out_s:5.2f} s = {r['output_processing_us_per_position']:5.1f} us/position; model runner's prompt "
              f"log-probs {r['model_runner_prompt_logprobs_s']:5.2f} s")
    save(f"vllm_scoring_{device}", {"prompts": args.prompts, "length": args.length, "positions": positions,
                                    "results": rows})


if __name__ == "__main__":
    main()
