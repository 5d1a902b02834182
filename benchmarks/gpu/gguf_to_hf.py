"""Convert a GGUF file to a bf16 Hugging Face folder (model + tokenizer), so repeated runs skip GGUF parsing."""

import sys

import torch

from osp_eval.models import load_model

src, dst = sys.argv[1], sys.argv[2]
model, tok = load_model(src, dtype=torch.bfloat16, device="cpu")
model.save_pretrained(dst)
tok.save_pretrained(dst)
print(f"saved {dst}")
