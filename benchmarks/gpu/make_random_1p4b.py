"""Save the random OSP-1.4B-shaped Llama (bf16, seed 0) as a model folder with a 49152-token tokenizer (SmolLM2's),
so whole-pipeline commands (`osp-eval table`) can time it like a real checkpoint. Its PPL means nothing."""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import osp_1p4b_config, random_model  # noqa: E402

dst, tokenizer_src = sys.argv[1], sys.argv[2]
model = random_model(osp_1p4b_config(), torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu")
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dst)
print(f"saved {dst}")
