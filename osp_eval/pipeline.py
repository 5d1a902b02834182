"""The Python API's main entry points: load + quantize, and the WikiText-2 PPL run."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .apply import quantize_
from .config import QuantConfig
from .data import calibration_ids, calibration_text, tokenize_text, wikitext2_data
from .errors import OspEvalError
from .models import load_model
from .ppl import check_seqlen, perplexity
from .provenance import version
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
QMODEL_FORMAT = "osp-eval-qmodel/2"


def check_positive(**flags) -> None:
    """Numeric flags that must be >= 1 (seqlen >= 2: a window of one token predicts nothing). None = unset."""
    for name, v in flags.items():
        low = 2 if name.endswith("seqlen") else 1
        if v is not None and (not isinstance(v, int) or v < low):
            raise OspEvalError(f"--{name} {v} must be an integer >= {low}")


@dataclass
class Inputs:
    """What a run was checked to have before any compute (`preflight`), and the content identity of it."""

    model_name: str
    gguf_file: str | None
    config: object  # the transformers config
    dims: object
    device: str
    fingerprint: dict  # provenance.model_fingerprint
    calib_text: tuple[str, str] | None = None
    calibration_sha256: str | None = None
    rotation_sha256: str | None = None
    qmodel: tuple[dict, dict] | None = None  # (state_dict, info) from --load_qmodel_path

    def identity(self, kind: str, cfg: QuantConfig, **extra) -> dict:
        """The identity of a result computed from these inputs by `cfg`: contents, not names."""
        return {"kind": kind, "osp_eval": version(), "model": self.fingerprint.get("digest"),
                "config": cfg.identity(), "calibration": self.calibration_sha256, "rotation": self.rotation_sha256,
                **extra}


def preflight(model_name: str, cfg: QuantConfig, *, gguf_file=None, dtype="auto", device=None, data_dir=None,
              output_dir=None, load_qmodel_path=None, seqlen=None) -> Inputs:
    """Every check that needs no compute, before the weights load: recipe, device, model files (readable,
    architecture supported, fingerprinted), dimensions vs recipe, rotation file, calibration data, a saved
    quantized model, and that the output folder is writable. Each failure is a one-line OspEvalError."""
    from .apply import check_dims
    from .arch import adapter_for_config
    from .models import load_config, resolve_device, resolve_dtype, resolve_model
    from .provenance import check_writable, file_sha256, model_fingerprint, text_sha256

    cfg.validate()
    device = resolve_device(device)
    resolve_dtype(dtype, device)
    src, gguf = resolve_model(model_name, gguf_file)
    fingerprint = model_fingerprint(model_name, gguf_file)
    config = load_config(src, gguf)
    dims = adapter_for_config(config).config_dims(config)
    check_dims(dims, cfg)
    if seqlen is not None:
        check_seqlen(config, seqlen)
    inputs = Inputs(model_name, gguf_file, config, dims, device, fingerprint)
    if cfg.rotate and cfg.optimized_rotation_path:
        from .rotation import load_rotations

        load_rotations(cfg.optimized_rotation_path, dims)  # keys, shapes, finite, orthogonal
        inputs.rotation_sha256 = file_sha256(cfg.optimized_rotation_path)
    gptq = cfg.w_bits < 16 and cfg.w_method == "gptq"
    if load_qmodel_path:
        inputs.qmodel = _load_qmodel_state(load_qmodel_path, cfg, fingerprint.get("digest"))
        inputs.calibration_sha256 = (inputs.qmodel[1].get("calibration") or {}).get("sha256") if gptq else None
    elif gptq:
        inputs.calib_text = calibration_text(cfg.calib_data, data_dir)
        inputs.calibration_sha256 = text_sha256(inputs.calib_text[0])
    if output_dir is not None:
        check_writable(output_dir)
    return inputs


def save_qmodel(model, cfg: QuantConfig, path: str, info: dict | None = None, fingerprint: dict | None = None) -> None:
    """Save the fake-quantized weights with the config and the source model's fingerprint (--load_qmodel_path),
    atomically."""
    from .provenance import torch_save_atomic

    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"format": QMODEL_FORMAT, "config": cfg.to_dict(), "info": info or {}, "state_dict": sd,
            "model_digest": (fingerprint or {}).get("digest")}
    torch_save_atomic(blob, path)


def _load_qmodel_state(path: str, cfg: QuantConfig, model_digest: str | None = None) -> tuple[dict, dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise OspEvalError(f"--load_qmodel_path: file not found: {path}") from e
    except Exception as e:  # garbage, truncated, or another format: torch's messages run to several lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OspEvalError(f"--load_qmodel_path: cannot read {path} ({first[:200]})") from e
    if not isinstance(blob, dict) or blob.get("format") != QMODEL_FORMAT:
        raise OspEvalError(f"--load_qmodel_path: {path} is not an osp-eval quantized model "
                           f"(format {QMODEL_FORMAT}; save one with --save_qmodel_path)")
    saved = blob["config"]
    diff = [f"{k}: saved {saved.get(k)!r}, asked {getattr(cfg, k)!r}" for k in _WEIGHT_FIELDS
            if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise OspEvalError(f"--load_qmodel_path: {path} was made with a different recipe ({'; '.join(diff)})")
    if model_digest is None or blob.get("model_digest") != model_digest:
        raise OspEvalError(f"--load_qmodel_path: {path} was made from another model (or one with no fingerprint): "
                           "its weights would not belong to this model")
    return blob["state_dict"], blob.get("info", {})


def offload_plan(inputs: Inputs, dtype="auto", offload: str = "auto") -> dict:
    """Whether to stream the layers (offload.decide on the weights' size in the target dtype); the record's
    "offload" field. A model too big for the GPU and the host is a one-line error here, before loading."""
    from .models import resolve_dtype
    from .offload import GiB, MODES, decide, model_bytes

    if offload not in MODES:
        raise OspEvalError(f"--offload {offload!r}: choose auto, on or off")
    if offload == "off" or (offload == "auto" and not str(inputs.device).startswith("cuda")):
        return {"mode": offload, "streamed": False}
    nbytes = model_bytes(inputs.config, resolve_dtype(dtype, inputs.device))
    return {"mode": offload, "streamed": decide(offload, nbytes, inputs.device), "weights_gib": round(nbytes / GiB, 3)}


def load_and_quantize(model_name: str, cfg: QuantConfig, *, gguf_file=None, dtype="auto", device=None,
                      data_dir=None, progress=True, save_qmodel_path=None, load_qmodel_path=None,
                      inputs: Inputs | None = None, offload: str = "auto", devices=None):
    """Load a model and apply `cfg` in place. Returns (model, tokenizer, info for the results file).

    `devices` (N or "auto", osp_eval.sharding): shard the model over N GPUs, whole decoder layers each. It is
    loaded and quantized on the CPU (GPTQ moves one layer at a time to the GPU), then placed.

    With `load_qmodel_path`, the weights come from an earlier run's `save_qmodel_path` (no GPTQ again); the
    rotations' online parts and the activation/KV quantizers are installed as usual. `inputs`: an earlier
    `preflight` of the same arguments (else it runs here). `offload` auto|on|off: stream the decoder layers
    through the device from the CPU (offload.py); auto does so when the weights do not fit the GPU.
    """
    from .models import resolve_dtype

    inputs = inputs or preflight(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                 data_dir=data_dir, load_qmodel_path=load_qmodel_path)
    from .sharding import place, resolve_devices

    shard = resolve_devices(devices, inputs.config, resolve_dtype(dtype, inputs.device))
    if shard and offload == "on":
        raise OspEvalError("--offload on with --devices: choose one (shard over several GPUs, or stream through one)")
    plan = {"mode": offload, "streamed": False} if shard else offload_plan(inputs, dtype, offload)
    if shard:  # loaded and quantized on the CPU (GPTQ visits the GPU layer by layer), placed at the end
        model, tok = load_model(model_name, gguf_file, resolve_dtype(dtype, inputs.device), "cpu")
    elif plan["streamed"]:  # the weights load on the CPU, in the dtype they would have on the device
        from .arch import get_adapter
        from .offload import stream_model

        model, tok = load_model(model_name, gguf_file, resolve_dtype(dtype, inputs.device), "cpu")
        stream_model(model, get_adapter(model).layers(model), inputs.device)
    else:
        model, tok = load_model(model_name, gguf_file, dtype, inputs.device)
    info = {"calibration": None, "offload": plan}
    t0 = time.perf_counter()
    if inputs.qmodel is not None:
        sd, info = inputs.qmodel
        quantize_(model, cfg.replace(w_bits=16), progress=progress)  # rotations and hooks; weights come next
        model.load_state_dict(sd, strict=True)
        info = {**info, "loaded_from": str(load_qmodel_path)}
    else:
        calib = None
        if inputs.calib_text is not None:
            calib, info["calibration"] = calibration_ids(tok, cfg.calib_data, cfg.nsamples, cfg.calib_seqlen,
                                                         cfg.seed, data_dir, text=inputs.calib_text)
        quantize_(model, cfg, calib, progress=progress)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    info["quantize_seconds"] = time.perf_counter() - t0
    if getattr(model, "osp_gptq_stats", None):  # per-layer times; for MoE, tokens and weight error per expert
        info["gptq"] = model.osp_gptq_stats
    if model.osp_source.get("gguf_file"):  # what osp-eval put back on transformers' GGUF config (gguf.py)
        info["gguf_config"] = model.osp_source["gguf_config"]
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    model.osp_config = cfg
    if shard:
        info["placement"] = place(model, shard)  # recorded, not part of the identity: it changes no number
    if save_qmodel_path:
        save_qmodel(model, cfg, save_qmodel_path, info, inputs.fingerprint)
    return model, tok, info


def _dtype_name(dtype, device) -> str:
    from .models import resolve_dtype

    return str(resolve_dtype(dtype, device)).replace("torch.", "")


def ppl_identity(inputs: Inputs, cfg: QuantConfig, data: dict, *, seqlen=2048, max_windows=None, dtype="auto",
                 backend="hf", compile: bool = False) -> dict:
    """A PPL cell's identity: model and data contents, the recipe's active fields, windowing, dtype, backend, and
    `compile` where on (compiled values differ from eager ones by float rounding, so they are other cells)."""
    return inputs.identity("ppl", cfg, data=data["sha256"], seqlen=seqlen, max_windows=max_windows,
                           dtype=_dtype_name(dtype, inputs.device), backend=backend,
                           **({"compile": True} if compile else {}))


def ppl_result_path(output_dir, model_name: str, cfg: QuantConfig, identity: dict, gguf_file=None) -> Path:
    """Where a PPL cell's JSON lives: `OUTPUT/ppl/<model>/<method>_w{W}a{A}kv{KV}_<identity hash>.json`.

    Every entry point (scripts/, osp-eval ppl, osp-eval table) names cells this way, so they reuse each other's;
    the folder name is for people, the hash (of contents) is what tells cells apart."""
    stem = f"{method_name(cfg)}_w{cfg.w_bits}a{cfg.a_bits}kv{cfg.k_bits}_{cell_key(**identity)}"
    return Path(output_dir) / "ppl" / model_slug(model_name, gguf_file) / f"{stem}.json"


def evaluate_ppl(model_name: str, cfg: QuantConfig, *, gguf_file=None, dtype="auto", device=None, data_dir=None,
                 seqlen=2048, batch_size=4, max_windows=None, output_dir="results", progress=True,
                 save_qmodel_path=None, load_qmodel_path=None, backend="hf", inputs: Inputs | None = None,
                 data: tuple[str, dict] | None = None, offload: str = "auto", devices=None,
                 cuda_graphs: bool = False, compile: bool = False) -> dict:
    """WikiText-2 test perplexity of `model_name` quantized by `cfg`: the result record, not yet saved
    (`save_ppl` writes it to record["result_path"]). Everything is checked before any compute.

    backend "vllm" quantizes with Transformers as usual, then scores the windows in a vLLM engine.
    `offload` (auto|on|off, see load_and_quantize) is recorded but is not part of the identity: it changes no number.
    `cuda_graphs`: replay the forward as a CUDA graph (ppl.graphed_forward: used only where it matched the eager
    forward bit for bit; the record's "cuda_graphs" says whether it ran); not part of the identity either.
    `compile`: the forward through torch.compile (ppl.compiled_forward; float-rounding differences from eager, so
    part of the identity; the record's "compiled" has the compile time, graph breaks and |Δlogit| vs eager).
    """
    from .provenance import now, peak_memory, reset_peak_memory

    started = now()
    reset_peak_memory()
    if backend not in ("hf", "vllm"):
        raise OspEvalError(f"--backend {backend!r}: choose hf or vllm")
    check_positive(seqlen=seqlen, batch_size=batch_size, max_windows=max_windows)
    if compile and (backend != "hf" or cuda_graphs):
        raise OspEvalError("--compile is for --backend hf without --cuda_graphs: drop one of the flags")
    text, data_info = data or wikitext2_data("test", data_dir)  # fail fast on missing or malformed data
    inputs = inputs or preflight(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                 data_dir=data_dir, output_dir=output_dir, load_qmodel_path=load_qmodel_path,
                                 seqlen=seqlen)
    identity = ppl_identity(inputs, cfg, data_info, seqlen=seqlen, max_windows=max_windows, dtype=dtype,
                            backend=backend, compile=compile)
    model, tok, info = load_and_quantize(model_name, cfg, gguf_file=gguf_file, dtype=dtype, device=device,
                                         data_dir=data_dir, progress=progress, save_qmodel_path=save_qmodel_path,
                                         load_qmodel_path=load_qmodel_path, inputs=inputs, offload=offload,
                                         devices=devices)
    ids = tokenize_text(tok, text)
    if backend == "vllm" and info["offload"]["streamed"]:
        raise OspEvalError("--backend vllm needs the whole model on the GPU: use --offload off or --backend hf")
    if backend == "vllm":
        from .vllm_backend import VllmEngine, perplexity_vllm

        engine = VllmEngine(model, tok, max_model_len=seqlen + 1)
        res = perplexity_vllm(engine, ids, seqlen, max_windows, batch_size, progress)
        res["vllm_start_seconds"] = engine.start_seconds
    else:
        res = perplexity(model, ids, seqlen, batch_size, max_windows, progress, cuda_graphs, compile)
    # full_split: every window of the reference split, not just of whatever file was given.
    res["all_windows"] = res["full_split"]
    res["full_split"] = res["all_windows"] and bool(data_info["is_reference_split"])
    record = {
        "kind": "ppl",
        "dataset": "wikitext-2-raw-v1 test",
        "model": model_name,
        "gguf_file": gguf_file,
        "model_fingerprint": inputs.fingerprint,
        "data": data_info,
        "method": method_name(cfg),
        "bits": f"{cfg.w_bits}-{cfg.a_bits}-{cfg.k_bits}",
        "config": cfg.to_dict(),
        "kernels": _resolve_kernels(cfg.kernels, next(model.parameters()).device),
        "identity": identity,
        **info,
        **res,
        "batch_size": batch_size,
        "backend": backend,
        "started": started,
        "peak_memory": peak_memory(),
    }
    record["result_path"] = str(ppl_result_path(output_dir, model_name, cfg, identity, gguf_file))
    return record


def _resolve_kernels(kernels: str, device) -> str:
    from .kernels import resolve_kernels

    return resolve_kernels(kernels, device)


def save_ppl(record: dict) -> Path:
    path = Path(record["result_path"])
    try:
        return save_result(record, path.parent, path.stem, started=record.get("started"))
    except OSError as e:
        raise OspEvalError(f"could not write the result to {path} ({e.strerror or e}); the number above is not saved")


def run_ppl(model_name: str, cfg: QuantConfig, **kw) -> dict:
    """evaluate_ppl, then save the record (its path in record["result_path"])."""
    record = evaluate_ppl(model_name, cfg, **kw)
    save_ppl(record)
    return record


def nonfinite_reason(record: dict) -> str:
    return (f"perplexity is {record.get('ppl_value')} ({record.get('nonfinite_windows')} of {record['nwindows']} "
            "windows have a non-finite loss): the forward pass overflowed (float16/bfloat16 range: try --dtype "
            "float32) or the quantized weights/rotations are broken")
