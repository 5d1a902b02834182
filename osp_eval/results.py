"""Results files: one JSON per run with the full configuration, the environment and the numbers."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("osp-eval", "torch", "transformers", "datasets", "lighteval", "vllm", "gguf", "tokenizers")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def cell_key(**parts) -> str:
    """A short stable name for a result cell (model, method, bits, ...), for file names."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def save_result(record: dict, output_dir: str | Path, stem: str) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **record,
        "versions": versions(),
        "device": device_info(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
