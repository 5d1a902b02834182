"""Shared fixtures: the real tiny model, SmolLM2-135M from its PyPI GGUF, and the offline data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OSP_EVAL_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Without a GPU, Triton kernels (osp_eval.kernels) run only under its interpreter; set before anything
    # imports triton, since triton reads it when it decorates the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _autograd_on():
    """Some libraries (lighteval) switch autograd off globally; every test starts with it on."""
    torch.set_grad_enabled(True)
    yield


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA} (set OSP_EVAL_SHARED)")
    return str(DATA)


@pytest.fixture(scope="session")
def stories_path() -> str:
    if not STORIES.is_dir():
        pytest.fail(f"stories260K not found at {STORIES}")
    return str(STORIES)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from osp_eval.models import smollm2_gguf_path

    return smollm2_gguf_path()


def load(path: str, dtype=torch.float32):
    from osp_eval.models import load_model

    return load_model(path, dtype=dtype, device="cpu")


@pytest.fixture
def stories(stories_path):
    """A fresh fp32 stories260K (model, tokenizer) per test: tests mutate models in place."""
    return load(stories_path)


@pytest.fixture(scope="session")
def _smollm2_state(smollm2_path):
    model, tok = load(smollm2_path)
    return model.state_dict(), model.config, tok


def rebuild(state) -> torch.nn.Module:
    """A fresh fp32 model from a cached (state_dict, config, tokenizer) triple (GGUF parsing is slow)."""
    from transformers import AutoModelForCausalLM

    sd, config, _ = state
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval().requires_grad_(False)


@pytest.fixture
def smollm2_factory(_smollm2_state):
    """Builds fresh fp32 SmolLM2-135M copies from a cached state dict."""
    return lambda: (rebuild(_smollm2_state), _smollm2_state[2])


@pytest.fixture
def smollm2(smollm2_factory):
    """A fresh fp32 SmolLM2-135M per test (tied embeddings, GQA 9/3 heads, head_dim 64)."""
    return smollm2_factory()


@pytest.fixture
def stories_factory(stories_path):
    return lambda: load(stories_path)
