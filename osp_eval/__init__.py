"""osp-eval: fake-quantize Hugging Face causal LMs (weights, activations, KV cache) and measure the damage."""

from .apply import quantize_
from .config import OSP, PRESETS, QUAROT_PAPER, QuantConfig, preset
from .errors import OspEvalError
from .models import load_model, load_tokenizer

__all__ = ["QuantConfig", "PRESETS", "OSP", "QUAROT_PAPER", "preset", "quantize_", "load_model", "load_tokenizer",
           "OspEvalError"]
__version__ = "0.3.1"
