"""Shared pieces of the benchmark scripts: the OSP-1.4B-shaped random model, timing, saving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from osp_eval.results import device_info, versions

RESULTS = Path(__file__).resolve().parent / "results"


def osp_1p4b_config(tiny: bool = False):
    """The OSP-1.4B shape (hidden 2048, 24 layers, 16 heads, FFN 5504 = 172·32, vocab 49152); `tiny` for CPU smoke runs."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           intermediate_size=172, vocab_size=512, max_position_embeddings=2048,
                           tie_word_embeddings=False)
    return LlamaConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                       intermediate_size=5504, vocab_size=49152, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def random_model(config, dtype, device, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.architectures = ["LlamaForCausalLM"]
    return model.eval().requires_grad_(False)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __enter__(self):
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.seconds = time.perf_counter() - self.t0


def save(name: str, record: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    record = {**record, "versions": versions(), "device": device_info(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"saved {path}")
    return path
