"""Results files: one JSON per run with the full configuration, its identity, provenance and the numbers.
Written atomically (temporary file + rename)."""

from __future__ import annotations

import math
from pathlib import Path

from .provenance import device_info, digest, provenance, versions, write_json_atomic

__all__ = ["cell_key", "save_result", "versions", "device_info", "finite_json"]


def cell_key(**parts) -> str:
    """A short stable name for a result cell, for file names: the hash of its identity."""
    return digest(parts)[:12]


def finite_json(obj):
    """NaN and infinity are not JSON: they become null (the record says elsewhere why a number is missing)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def save_result(record: dict, output_dir: str | Path, stem: str, started: str | None = None) -> Path:
    """Write `OUTPUT_DIR/STEM.json`: the record plus its provenance (command, code version and git commit,
    package versions, device, peak memory, start and finish dates)."""
    prov = provenance(started)
    record = {**record, "versions": prov["versions"], "device": prov["device"], "date": prov["finished"],
              "provenance": prov}
    return write_json_atomic(Path(output_dir) / f"{stem}.json", finite_json(record))
