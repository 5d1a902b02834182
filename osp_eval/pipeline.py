"""The Python API's main entry points: load + quantize, and the WikiText-2 PPL run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from .apply import quantize_
from .config import QuantConfig
from .data import calibration_ids, calibration_text, tokenize_text, wikitext2_text
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


# Fields that must agree between a saved quantized model and the config it is loaded for.
_WEIGHT_FIELDS = ("w_bits", "w_groupsize", "w_asym", "w_clip", "w_method", "rotate", "rotate_down_proj",
                  "center_embeddings", "optimized_rotation_path", "rotation_seed", "o_proj_input", "percdamp",
                  "act_order", "static_groups", "nsamples", "calib_data", "calib_seqlen", "seed")


def save_qmodel(model, cfg: QuantConfig, path: str, info: dict | None = None) -> None:
    """Save the fake-quantized weights with the config that made them (reused by --load_qmodel_path)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": "osp-eval-qmodel/1", "config": cfg.to_dict(), "info": info or {}, "state_dict": sd}, path)


def _load_qmodel_state(path: str, cfg: QuantConfig) -> tuple[dict, dict]:
    from .errors import OspEvalError

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise OspEvalError(f"--load_qmodel_path: file not found: {path}") from e
    if not isinstance(blob, dict) or blob.get("format") != "osp-eval-qmodel/1":
        raise OspEvalError(f"--load_qmodel_path: {path} is not an osp-eval quantized model")
    saved = blob["config"]
    diff = [f"{k}: saved {saved.get(k)!r}, asked {getattr(cfg, k)!r}" for k in _WEIGHT_FIELDS
            if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise OspEvalError(f"--load_qmodel_path: {path} was made with a different recipe ({'; '.join(diff)})")
    return blob["state_dict"], blob.get("info", {})


def load_and_quantize(model_name: str, cfg: QuantConfig, *, gguf_file=None, dtype="auto", device=None,
                      data_dir=None, progress=True, save_qmodel_path=None, load_qmodel_path=None):
    """Load a model and apply `cfg` in place. Returns (model, tokenizer, info for the results file).

    With `load_qmodel_path`, the weights come from an earlier run's `save_qmodel_path` (no GPTQ again); the
    rotations' online parts and the activation/KV quantizers are installed as usual.
    """
    cfg.validate()
    needs_calib = cfg.w_bits < 16 and cfg.w_method == "gptq" and not load_qmodel_path
    calib_text = calibration_text(cfg.calib_data, data_dir) if needs_calib else None  # fail before loading
    model, tok = load_model(model_name, gguf_file, dtype, device)
    info = {"calibration": None}
    t0 = time.perf_counter()
    if load_qmodel_path:
        sd, info = _load_qmodel_state(load_qmodel_path, cfg)
        quantize_(model, cfg.replace(w_bits=16), progress=progress)  # rotations and hooks; weights come next
        model.load_state_dict(sd, strict=True)
        info = {**info, "loaded_from": str(load_qmodel_path)}
    else:
        calib = None
        if needs_calib:
            calib, info["calibration"] = calibration_ids(tok, cfg.calib_data, cfg.nsamples, cfg.calib_seqlen,
                                                         cfg.seed, data_dir, text=calib_text)
        quantize_(model, cfg, calib, progress=progress)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    info["quantize_seconds"] = time.perf_counter() - t0
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    model.osp_config = cfg
    if save_qmodel_path:
        save_qmodel(model, cfg, save_qmodel_path, info)
    return model, tok, info


def run_ppl(model_name: str, cfg: QuantConfig, *, gguf_file=None, dtype="auto", device=None, data_dir=None,
            seqlen=2048, batch_size=4, max_windows=None, output_dir="results", progress=True,
            save_qmodel_path=None, load_qmodel_path=None, backend="hf") -> dict:
    """WikiText-2 test perplexity of `model_name` quantized by `cfg`; writes and returns the result record.

    backend "vllm" quantizes with Transformers as usual, then scores the windows in a vLLM engine.
    """
    from .errors import OspEvalError
    from .models import load_config, resolve_model

    if backend not in ("hf", "vllm"):
        raise OspEvalError(f"--backend {backend!r}: choose hf or vllm")
    check_seqlen(load_config(*resolve_model(model_name, gguf_file)), seqlen)
    text = wikitext2_text("test", data_dir)  # fail fast on missing data, before loading the model
    model, tok, info = load_and_quantize(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                         data_dir=data_dir, progress=progress, save_qmodel_path=save_qmodel_path,
                                         load_qmodel_path=load_qmodel_path)
    ids = tokenize_text(tok, text)
    if backend == "vllm":
        from .vllm_backend import VllmEngine, perplexity_vllm

        engine = VllmEngine(model, tok, max_model_len=seqlen + 1)
        res = perplexity_vllm(engine, ids, seqlen, max_windows, batch_size, progress)
        res["vllm_start_seconds"] = engine.start_seconds
    else:
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
        "backend": backend,
    }
    path = ppl_result_path(output_dir, model_name, cfg, gguf_file=gguf_file, seqlen=seqlen, max_windows=max_windows,
                           dtype=info["dtype"], backend=backend)
    record["result_path"] = str(save_result(record, path.parent, path.stem))
    return record


def ppl_result_path(output_dir, model_name: str, cfg: QuantConfig, *, gguf_file=None, seqlen=2048,
                    max_windows=None, dtype="auto", device=None, backend="hf") -> Path:
    """Where a PPL cell's JSON lives: `OUTPUT/ppl/<model>/<method>_w{W}a{A}kv{KV}_<hash>.json`.

    Every entry point (scripts/, osp-eval ppl, osp-eval table) names cells this way, so they reuse each other's.
    The hash covers the full config, the windowing and the dtype.
    """
    from .models import default_device, resolve_dtype

    dt = str(resolve_dtype(dtype, device or default_device())).replace("torch.", "")
    # The backend joins the hash only when not hf, so existing cells keep their names.
    extra = {} if backend == "hf" else {"backend": backend}
    key = cell_key(config=cfg.to_dict(), seqlen=seqlen, max_windows=max_windows, dtype=dt, **extra)
    stem = f"{method_name(cfg)}_w{cfg.w_bits}a{cfg.a_bits}kv{cfg.k_bits}_{key}"
    return Path(output_dir) / "ppl" / model_slug(model_name, gguf_file) / f"{stem}.json"
