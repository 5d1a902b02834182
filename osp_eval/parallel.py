"""Data parallelism for evaluation: N processes, each holding one replica of the quantized model, each scoring a
share of the work, the results merged on every rank. A thin layer over torch.distributed (NCCL on CUDA, gloo on
CPU) with three operations: which rank am I (`init`), which items are mine (`shard`), and the union of every
rank's results (`gather`).

Launch with `torchrun --nproc_per_node N script ...` (the environment says rank and world size), or let `launch`
spawn the N processes itself. Without either, the world is one process and every function is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import OspEvalError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, torch.distributed unused

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def world() -> World:
    return _WORLD


def init(size: int | None = None, rank: int | None = None, backend: str | None = None,
         local_rank: int | None = None) -> World:
    """Join the process group: arguments, else torchrun's WORLD_SIZE / RANK / LOCAL_RANK, else a world of one.
    Backend: NCCL when CUDA is available, else gloo. Idempotent."""
    global _WORLD
    size = int(size if size is not None else os.environ.get("WORLD_SIZE", 1))
    rank = int(rank if rank is not None else os.environ.get("RANK", 0))
    local_rank = int(local_rank if local_rank is not None else os.environ.get("LOCAL_RANK", rank))
    if size < 1 or not 0 <= rank < size:
        raise OspEvalError(f"bad data-parallel layout: rank {rank} of world size {size}")
    if size == 1:
        _WORLD = World()
        return _WORLD
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # all_gather_object stages objects on the current device
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=rank, world_size=size)
    _WORLD = World(rank, size, local_rank, dist.get_backend())
    return _WORLD


def close() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def device(requested: str | None) -> str | None:
    """This rank's device: its own GPU (cuda:<local_rank>) when the run asks for CUDA (or for nothing and CUDA is
    there), cpu when it asks for cpu. One process: the request unchanged."""
    w = _WORLD
    if w.size == 1:
        return requested
    if requested is not None and str(requested).startswith("cpu"):
        return "cpu"
    if requested is not None and ":" in str(requested):
        raise OspEvalError(f"--device {requested}: with data parallelism each process takes cuda:<local rank>; "
                           "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    return f"cuda:{w.local_rank}" if torch.cuda.is_available() else "cpu"


def shard(n_items: int) -> list[int]:
    """This rank's items of 0..n_items-1: round-robin, so when the items are sorted by cost (longest first)
    every rank gets an equal mix of long and short ones."""
    return list(range(_WORLD.rank, n_items, _WORLD.size))


def gather(local: dict, agree=None) -> dict:
    """The union of every rank's `local` dict, on every rank (keys must not overlap between ranks).

    `agree`: a small value every rank must hold equally (a digest of the work list): a rank that split different
    work would otherwise merge into silently wrong results."""
    if _WORLD.size == 1:
        return dict(local)
    parts = [None] * _WORLD.size
    dist.all_gather_object(parts, (agree, local))
    if any(a != parts[0][0] for a, _ in parts):
        raise OspEvalError(f"data-parallel ranks disagree on the work to share ({[a for a, _ in parts]})")
    parts = [p for _, p in parts]
    merged = {}
    for part in parts:
        merged.update(part)
    if len(merged) != sum(len(p) for p in parts):
        raise OspEvalError("internal error: two data-parallel ranks returned results for the same item")
    return merged


@torch.no_grad()
def broadcast_model(model: torch.nn.Module) -> int:
    """Make every replica rank 0's: broadcast each state_dict tensor from rank 0. Returns how many tensors
    differed on this rank before (0 when quantization was already identical everywhere, as it should be)."""
    if _WORLD.size == 1:
        return 0
    differed = 0
    home = torch.device("cuda", torch.cuda.current_device()) if _WORLD.backend == "nccl" else torch.device("cpu")
    for t in model.state_dict().values():
        buf = t.detach().to(home, copy=True)  # NCCL moves CUDA tensors only, gloo CPU ones
        dist.broadcast(buf, src=0)
        if not torch.equal(buf.to(t.device), t):
            differed += 1
            t.copy_(buf)
    return differed


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block before the others (it fills a cache they then read instead of racing to fill it)."""
    if _WORLD.size > 1 and not _WORLD.main:
        dist.barrier()
    yield
    if _WORLD.size > 1 and _WORLD.main:
        dist.barrier()


def layout(device_name: str | None) -> dict:
    """The data-parallel layout for the result record (not part of a result's identity: it changes no number)."""
    w = _WORLD
    devices = [str(device_name)]
    if w.size > 1:
        devices = [None] * w.size
        dist.all_gather_object(devices, str(device_name))
    return {"world_size": w.size, "backend": w.backend, "devices": devices}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, backend: str | None, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    init(size, rank, backend, rank)
    try:
        fn(*args)
    finally:
        close()


def launch(fn, size: int, *args, backend: str | None = None) -> None:
    """Run `fn(*args)` in `size` fresh processes forming one world (`--data_parallel N`). A failure in any of
    them is raised here as one line."""
    import torch.multiprocessing as mp

    if size == 1:
        fn(*args)
        return
    try:
        mp.spawn(_worker, args=(size, _free_port(), backend, fn, args), nprocs=size, join=True)
    except mp.ProcessRaisedException as e:
        lines = [s for s in str(e).strip().splitlines() if s.strip()]
        last = (lines[-1] if lines else str(e)).removeprefix("osp_eval.errors.OspEvalError: ")
        raise OspEvalError(f"a data-parallel process failed: {last}") from None
