"""Save a random-weight model (bf16, seed 0) as a model folder with a 49152-token tokenizer (SmolLM2's), so
whole-pipeline commands (`osp-eval table`, `lighteval_ptq.py`) can time it like a real checkpoint. Its PPL and
scores mean nothing. The shape is the OSP-1.4B Llama, or one of bench_large.py's (llama3-8b, qwen2.5-7b; their
vocabularies are larger than the tokenizer's, so every token id is valid).

  python benchmarks/gpu/make_random_1p4b.py DST TOKENIZER_SRC [llama3-8b|qwen2.5-7b]
"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import osp_1p4b_config, random_model  # noqa: E402

dst, tokenizer_src = sys.argv[1], sys.argv[2]
device = "cuda" if torch.cuda.is_available() else "cpu"
if len(sys.argv) > 3:
    from bench_large import make_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(make_config(sys.argv[3], tiny=False), dtype=torch.bfloat16)
else:
    model = random_model(osp_1p4b_config(), torch.bfloat16, device)
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dst)
print(f"saved {dst}")
