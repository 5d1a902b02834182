"""The Python API's main entry points: load + quantize, and the WikiText-2 PPL run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from .apply import quantize_
from .config import QuantConfig
from .data import calibration_ids, tokenize_text, wikitext2_text
from .models import load_model
from .ppl import check_seqlen, perplexity
from .results import cell_key, save_result


def method_name(cfg: QuantConfig) -> str:
    """The OSP table's row names: rtn, ffn_had, gptq, quarot, spinquant (other mixes get plain names)."""
    if cfg.w_bits == 16 and cfg.a_bits == 16 and cfg.k_bits == 16 and cfg.v_bits == 16 and not (
        cfg.rotate or cfg.rotate_down_proj
    ):
        return "fp"
    w = cfg.w_method if cfg.w_bits < 16 else "w16"
    if cfg.rotate:
        base = "spinquant" if cfg.optimized_rotation_path else "quarot"
        return base if w == "gptq" else f"{base}_{w}"
    if cfg.rotate_down_proj:
        return {"rtn": "ffn_had", "gptq": "gptq"}.get(w, f"{w}_ffn_had")
    return {"rtn": "rtn"}.get(w, f"{w}_nohad")


def model_slug(name: str, gguf_file: str | None = None) -> str:
    base = Path(gguf_file).stem if gguf_file else Path(name.rstrip("/")).name
    if name.endswith(".gguf"):
        base = Path(name).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)


def load_and_quantize(model_name: str, cfg: QuantConfig, *, gguf_file=None, dtype="auto", device=None,
                      data_dir=None, progress=True):
    """Load a model and apply `cfg` in place. Returns (model, tokenizer, info for the results file)."""
    cfg.validate()
    model, tok = load_model(model_name, gguf_file, dtype, device)
    info = {"calibration": None}
    calib = None
    if cfg.w_bits < 16 and cfg.w_method == "gptq":
        calib, info["calibration"] = calibration_ids(tok, cfg.calib_data, cfg.nsamples, cfg.calib_seqlen, cfg.seed,
                                                     data_dir)
    t0 = time.perf_counter()
    quantize_(model, cfg, calib, progress=progress)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    info["quantize_seconds"] = time.perf_counter() - t0
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return model, tok, info


def run_ppl(model_name: str, cfg: QuantConfig, *, gguf_file=None, dtype="auto", device=None, data_dir=None,
            seqlen=2048, batch_size=4, max_windows=None, output_dir="results", progress=True) -> dict:
    """WikiText-2 test perplexity of `model_name` quantized by `cfg`; writes and returns the result record."""
    from .models import load_config, resolve_model

    check_seqlen(load_config(*resolve_model(model_name, gguf_file)), seqlen)
    text = wikitext2_text("test", data_dir)  # fail fast on missing data, before loading the model
    model, tok, info = load_and_quantize(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                         data_dir=data_dir, progress=progress)
    ids = tokenize_text(tok, text)
    res = perplexity(model, ids, seqlen, batch_size, max_windows, progress)
    method = method_name(cfg)
    record = {
        "kind": "ppl",
        "dataset": "wikitext-2-raw-v1 test",
        "model": model_name,
        "gguf_file": gguf_file,
        "method": method,
        "bits": f"{cfg.w_bits}-{cfg.a_bits}-{cfg.k_bits}",
        "config": cfg.to_dict(),
        **info,
        **res,
        "batch_size": batch_size,
    }
    slug = model_slug(model_name, gguf_file)
    key = cell_key(config=cfg.to_dict(), seqlen=seqlen, max_windows=max_windows, dtype=info["dtype"])
    stem = f"{method}_w{cfg.w_bits}a{cfg.a_bits}kv{cfg.k_bits}_{key}"
    record["result_path"] = str(save_result(record, Path(output_dir) / "ppl" / slug, stem))
    return record
