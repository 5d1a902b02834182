"""Pipeline sharding for a model larger than one GPU: whole decoder layers, contiguous, per device (the embedding
on the first, the final norm and lm_head on the last), dispatched with accelerate.

Whole layers only: every Linear stays on one device, so weight quantizers (per output row, GPTQ's Hessian per
layer) and activation quantizers (per token over the whole hidden size) see exactly what they see on one GPU. The
model is quantized first (on the CPU, GPTQ moving one layer at a time to the GPU) and placed afterwards.
"""

from __future__ import annotations

from torch import nn

from .errors import OspEvalError
from .offload import gpu_free
from .offload import model_bytes as config_bytes

GIB = 2**30


def shard_plan(layer_bytes: list[int], capacities: list[int], first_extra: int = 0,
               last_extra: int = 0) -> list[list[int]]:
    """Decoder layers per device: contiguous runs of whole layers, in device order, with the largest per-device
    load (first_extra rides with layer 0, last_extra with the last layer) as small as the capacities allow.
    Devices past the last one needed get empty lists. Raises a one-line OspEvalError when nothing fits."""
    n = len(layer_bytes)
    if n == 0 or not capacities:
        raise OspEvalError("shard_plan: need at least one layer and one device")
    items = list(layer_bytes)
    items[0] += first_extra
    items[-1] += last_extra

    def fill(limit: int) -> list[list[int]] | None:
        # Greedy: each device takes layers while they fit under min(its capacity, limit). For contiguous runs
        # this is optimal (taking fewer layers early never lets a later device take more).
        plan, pos = [], 0
        for cap in capacities:
            room, run = min(cap, limit), []
            while pos < n and items[pos] <= room:
                room -= items[pos]
                run.append(pos)
                pos += 1
            plan.append(run)
        return plan if pos == n else None

    total = sum(items)
    if fill(total) is None:
        need = ", ".join(f"{b / GIB:.2f}" for b in (sum(layer_bytes), first_extra, last_extra))
        have = " + ".join(f"{c / GIB:.2f}" for c in capacities)
        raise OspEvalError(f"the model does not fit the devices: it needs {total / GIB:.2f} GiB (layers, first, last "
                           f"= {need} GiB; largest layer {max(items) / GIB:.2f} GiB) and the {len(capacities)} "
                           f"device(s) hold {have} GiB as whole layers: use more or larger devices, or a smaller "
                           "--dtype")
    lo, hi = max(items), total  # the smallest limit that still fits: the most balanced plan
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return fill(lo)


def _bytes(module: nn.Module, seen: set) -> int:
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:  # a tied weight counts once
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def model_bytes(model: nn.Module) -> tuple[list[int], int, int]:
    """(bytes of each decoder layer, bytes that go with the first layer, bytes that go with the last one)."""
    from .arch import get_adapter

    ad, seen = get_adapter(model), set()
    first = _bytes(ad.embed(model), seen)
    layers = [_bytes(layer, seen) for layer in ad.layers(model)]
    last = _bytes(ad.final_norm(model), seen) + _bytes(ad.lm_head(model), seen)  # 0 more for a tied head
    rest = _bytes(model, seen)  # rotary tables and other small modules: with the embedding
    return layers, first + rest, last


def device_map(model: nn.Module, plan: list[list[int]], devices: list[str]) -> dict[str, str]:
    """An accelerate device_map (module name -> device) for `plan`: layer i on its device, the embedding and
    every module outside the layers on the first device, the final norm and lm_head on the device of the last
    layer (a tied lm_head stays with the embedding: one weight, one device)."""
    from .arch import get_adapter

    ad = get_adapter(model)
    first = devices[0]
    last = devices[max(d for d, run in enumerate(plan) if run)]
    out = {f"{ad.layers_path}.{i}": devices[d] for d, run in enumerate(plan) for i in run}
    tied = ad.lm_head(model).weight is ad.embed(model).weight
    out |= {ad.embed_path: first, ad.final_norm_path: last, ad.lm_head_path: first if tied else last}
    covered = tuple(out)
    for name, module in model.named_modules():
        inside = any(name == c or name.startswith(c + ".") for c in covered)
        own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if own and not inside and name:
            out[name] = first
    return out


def cuda_capacities(devices: list[str], headroom: float = 0.85) -> list[int]:
    """Bytes of weights each GPU should hold: its free memory less room for activations and the KV cache."""
    return [int(gpu_free(d) * headroom) for d in devices]


def place(model: nn.Module, devices: list[str], capacities: list[int] | None = None) -> dict:
    """Shard `model` over `devices` (whole layers, contiguous) and dispatch it with accelerate; hidden states
    hop between devices at layer boundaries and the output comes back on the first device. Returns the layout
    for the result record."""
    from accelerate import dispatch_model

    layers, first, last = model_bytes(model)
    capacities = capacities or cuda_capacities(devices)
    plan = shard_plan(layers, capacities, first, last)
    dmap = device_map(model, plan, devices)
    dispatch_model(model, device_map=dmap, main_device=devices[0])
    used = [d for d, run in enumerate(plan) if run]
    load = [sum(layers[i] for i in run) + (first if d == used[0] else 0) + (last if d == used[-1] else 0)
            for d, run in enumerate(plan)]
    return {"devices": devices, "layers": [[run[0], run[-1]] if run else None for run in plan],
            "gib": [round(b / GIB, 3) for b in load]}


def resolve_devices(devices, config, dtype) -> list[str] | None:
    """`--devices N|auto` -> the GPUs to shard over (None: the model stays on one device). auto shards over every
    visible GPU only when the weights alone would take more than one GPU's capacity."""
    import torch

    if devices in (None, 1, "1"):
        return None
    gpus = torch.cuda.device_count()
    if devices == "auto":
        if gpus < 2 or config_bytes(config, dtype) <= cuda_capacities(["cuda:0"])[0]:
            return None
        return [f"cuda:{i}" for i in range(gpus)]
    n = int(devices)
    if n > gpus:
        raise OspEvalError(f"--devices {n}: only {gpus} CUDA device(s) visible (pipeline sharding is over GPUs)")
    return [f"cuda:{i}" for i in range(n)]
