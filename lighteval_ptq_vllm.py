#!/usr/bin/env python
"""lighteval_ptq.py with greedy generation (and, with --loglik_backend vllm, log-likelihoods) in vLLM: same flags,
same results files plus "backend": "vllm"; the same as `lighteval_ptq.py --backend vllm`.

    python lighteval_ptq_vllm.py MODEL --w_bits 4 --a_bits 4 --kv_bits 4 [--rotate | --rotate_down_proj] \
        --tasks tasks/tasks.txt [--loglik_backend hf|vllm]

The model is quantized by Transformers as usual, then pushed into an in-process vLLM engine
(osp_eval/vllm_backend.py) with its online transforms (activation and K/V fake quant, online Hadamards), which
generates for GSM8K and TriviaQA with the Transformers path's prompts and stop strings. The multiple-choice rows
are scored where it was measured faster (H100, SmolLM2-135M: by the Transformers model, 86 s vs unfinished at
200 s for vLLM's prompt log-probs; benchmarks/RESULTS.md); --loglik_backend vllm scores them in vLLM instead.
lighteval's own vLLM backend does not work with vLLM 0.32 (see the shared ENVIRONMENT.md §6).
"""

import sys

from osp_eval.cli import run
from osp_eval.lighteval_cli import build_parser

if __name__ == "__main__":
    parser = build_parser(prog="lighteval_ptq_vllm.py")
    parser.set_defaults(backend="vllm")
    args = parser.parse_args()
    sys.exit(run(args.func, args))
