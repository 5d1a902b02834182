"""Local task data for lighteval: each task's files converted once into a dataset folder under the osp-eval
cache (~/.cache/osp-eval/lighteval-data), keyed by the sha256 of the files, which lighteval loads as `hf_repo`."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm


def _cache_root() -> Path:
    base = os.environ.get("OSP_EVAL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "osp-eval")
    return Path(base).expanduser()


def local_configs(names: list[str], data_dir: Path, progress: bool) -> tuple[list, dict, dict]:
    """Task configs on local files, each converted once per (its data files, the converter format) into the
    osp-eval cache: a stable folder, so `datasets` reuses its own Arrow cache. Missing data -> listed skip."""
    from . import lighteval_tasks as lt

    configs, skipped, notes = [], {}, {}
    for n in tqdm(names, desc="local data", disable=not progress):
        # The converted folder is named by the sha256 of the files it was made from: edited data never
        # reuses an old conversion.
        stamp = hashlib.sha256(f"format {lt.LOCAL_FORMAT} {task_data_digest(n, data_dir)}".encode())
        folder = _cache_root() / "lighteval-data" / f"{lt.folder_name(n)}-{stamp.hexdigest()[:12]}"
        try:
            configs.append(_converted(n, data_dir, folder))
        except lt.MissingData as e:
            skipped[n] = str(e)
            continue
        if lt.LOCAL[n].not_exact:
            notes[n] = lt.LOCAL[n].not_exact
    return configs, skipped, notes


def task_data_digest(name: str, data_dir: Path) -> str | None:
    """sha256 over the contents of a task's local data files (None when it has none)."""
    from . import lighteval_tasks as lt
    from .provenance import digest, file_sha256

    files = [p for rel in lt.LOCAL[name].files for p in sorted(data_dir.glob(rel.replace("<subject>", "*")))]
    return digest({str(p.relative_to(data_dir)): file_sha256(p) for p in files}) if files else None


def _converted(name: str, data_dir: Path, folder: Path):
    from .lighteval_tasks import local_config, write_local

    if not (folder / "README.md").is_file():
        tmp = Path(tempfile.mkdtemp(dir=_mkdir(folder.parent), prefix=".tmp-"))
        try:
            written = write_local(name, data_dir, tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(written, folder)  # atomic: a concurrent run never reads half a folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return local_config(name, folder)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
