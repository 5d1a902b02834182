"""Layer-streamed execution for models larger than GPU memory.

The weights stay on the CPU; the model's shell (embeddings, rotary, final norm, lm_head) sits on the compute
device, and the decoder layers visit it one at a time (`walk`), the next layer being copied on a side CUDA stream
while the current one computes. Work is layer-major: the hidden states of every window/sample enter layer i
(`capture_inputs`), run through it (`run_layer`), and feed layer i+1. Each layer call gets the same inputs, in the
same batches, as in the normal model forward, so the results are the same numbers, not approximations.
On a CPU "device" nothing moves and the same code runs (what the CPU tests check).
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import nn

from .errors import OspEvalError

MODES = ("auto", "on", "off")
GiB = 2**30


class StopForward(Exception):
    """Raised from a hook to end a forward early: everything needed has been seen."""


# --------------------------------------------------------------------------- moving weights


def _slots(modules):
    """(dict, key) of every parameter and buffer owned directly by `modules`."""
    return [(d, k) for m in modules for d in (m._parameters, m._buffers) for k, t in d.items() if t is not None]


def place(module, device, non_blocking: bool = False, pin: bool = False) -> list[torch.Tensor]:
    """Move a module's (or a list of modules', non-recursively) parameters and buffers to `device` in place.
    Returns the tensors they held before, for `restore` (a read-only visit copies nothing back). `pin`: first
    replace CPU tensors by page-locked copies, so that later copies to the GPU are truly asynchronous."""
    modules = list(module.modules()) if isinstance(module, nn.Module) else list(module)
    device = torch.device(device)
    before = []
    for d, k in _slots(modules):
        t = d[k]
        if pin and t.device.type == "cpu" and not t.is_pinned():
            _assign(d, k, t.data.pin_memory())
            t = d[k]
        before.append(t.data)
        if t.device != device:
            _assign(d, k, t.data.to(device, non_blocking=non_blocking))
    return before


def restore(module, before: list[torch.Tensor]) -> None:
    """Put back the tensors `place` returned (the device copies are dropped)."""
    modules = list(module.modules()) if isinstance(module, nn.Module) else list(module)
    for (d, k), t in zip(_slots(modules), before, strict=True):
        _assign(d, k, t)


def _assign(d: dict, k: str, t: torch.Tensor) -> None:
    if isinstance(d[k], nn.Parameter):
        d[k].data = t  # the Parameter object stays: tied weights stay tied
    else:
        d[k] = t


def shell(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The model's modules outside the decoder layers: embeddings, rotary embedding, final norm, lm_head."""
    inside = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def walk(layers, device, fn, write_back: bool = False):
    """Yield fn(i, layer) for each layer, with the layer on `device` meanwhile and the next one being copied on
    a side stream. After fn, a read-only visit drops the device copy; `write_back` (GPTQ, rotations, RTN change
    weights) brings the layer home to the CPU, including modules fn added. Layers already on `device` stay."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fetch(layer):
        home = next(layer.parameters()).device
        if stream is None or home == device:
            return home, place(layer, device)
        with torch.cuda.stream(stream):
            before = place(layer, device, non_blocking=True, pin=True)
        return home, before

    nxt = fetch(layers[0]) if len(layers) else None
    for i, layer in enumerate(layers):
        (home, before), nxt = nxt, None
        if stream is not None and home != device:
            current = torch.cuda.current_stream(device)
            current.wait_stream(stream)
            for t in layer.parameters():  # freed after use: not before this stream's kernels are done with it
                t.data.record_stream(current)
            for t in layer.buffers():
                t.record_stream(current)
        if i + 1 < len(layers):
            nxt = fetch(layers[i + 1])
        yield fn(i, layer)
        if home == device:
            continue
        if write_back:
            layer.to(home)
        else:
            restore(layer, before)


# --------------------------------------------------------------------------- layer-major execution


def _to(obj, device):
    """Move the tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _skip(*args, **kwargs):  # a layer while capturing: the hidden states pass through unchanged
    return args[0] if args else kwargs["hidden_states"]


class _Skipped:
    """Inside the block, every decoder layer passes its input through (the last one may return `last(x)`)."""

    def __init__(self, layers, last=None):
        self.layers, self.last = layers, last

    def __enter__(self):
        for layer in self.layers:
            layer.forward = _skip
        if self.last is not None:
            self.layers[-1].forward = lambda *a, **k: self.last(_skip(*a, **k))

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward  # back to the class's forward


def capture_inputs(model: nn.Module, layers, ids: torch.Tensor, bs: int, device, store=None, **model_kw):
    """Hidden states entering the first decoder layer [n, ...] (kept on `store`, default `device`), and the other
    arguments of every layer's call per batch of `bs` rows of `ids` (on `device`): families with sliding-window and
    global layers (Gemma, Qwen3, Mistral) give each layer type its own mask and position embeddings. Layers are
    skipped while capturing (their arguments do not depend on the hidden states); tensors shared by layers are
    stored once."""
    store = device if store is None else store
    inps, calls, pending = None, [], {}

    def hook(i, module, args, kwargs):
        nonlocal inps
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("hidden_states", None)
        if i == 0:
            if inps is None:
                inps = torch.empty((len(ids), *x.shape[1:]), dtype=x.dtype, device=store)
            start = sum(c[0] for c in calls)
            inps[start : start + len(x)] = x
            pending.clear()
            pending.update(n=len(x), args=_to(tuple(args[1:]), device), per_layer=[], moved={})
        moved = pending["moved"]  # id(original tensor) -> its copy on `device`: one copy per shared tensor

        def move(obj):
            if isinstance(obj, torch.Tensor):
                if id(obj) not in moved:
                    moved[id(obj)] = (obj, obj.to(device))
                return moved[id(obj)][1]
            if isinstance(obj, (tuple, list)):
                return type(obj)(move(o) for o in obj)
            if isinstance(obj, dict):
                return {k: move(v) for k, v in obj.items()}
            return obj

        pending["per_layer"].append(move(kwargs))
        if i == len(layers) - 1:
            calls.append((pending["n"], pending["args"], pending["per_layer"]))
            raise StopForward
        return None

    embed_device = model.get_input_embeddings().weight.device
    handles = [layer.register_forward_pre_hook(partial(hook, i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with _Skipped(layers):
            for i in range(0, len(ids), bs):
                try:
                    model(input_ids=ids[i : i + bs].to(embed_device), use_cache=False, **model_kw)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return inps, calls


def run_layer(layer: nn.Module, index: int, inps: torch.Tensor, calls, out: torch.Tensor | None = None,
              hooks=None) -> None:
    """Run layer `index` on all rows, batch by batch, as the model calls it; write the outputs to `out`.
    `inps`/`out` may live on the CPU: each batch goes to the layer's device and back."""
    device = next(layer.parameters()).device
    start = 0
    for n, args, per_layer in calls:
        if hooks is not None:
            hooks.start_forward()
        try:
            y = layer(inps[start : start + n].to(device, non_blocking=True), *args, **per_layer[index])
            if out is not None:
                out[start : start + n] = y[0] if isinstance(y, (tuple, list)) else y
        except StopForward:
            pass
        start += n
    if hooks is not None:
        hooks.start_forward()  # drop the references to the last batch's inputs


def head(model: nn.Module, layers, ids: torch.Tensor, hidden: torch.Tensor, **model_kw):
    """The model's forward on `ids` from the last decoder layer's output `hidden` on: the final norm, lm_head and
    whatever the family does after them (soft-capping, logit scaling), all by the model's own code."""
    device = model.get_input_embeddings().weight.device
    with _Skipped(layers, last=lambda x: hidden.to(x.device)):
        return model(input_ids=ids.to(device), use_cache=False, **model_kw)


def storage(device, nbytes: int) -> torch.device:
    """Where layer-major hidden states live: on the device when two copies (inputs, outputs) fit beside a margin,
    else on the CPU (each batch then travels to the device and back)."""
    device = torch.device(device)
    if device.type == "cuda" and 2 * nbytes + 8 * GiB > gpu_free(device):
        return torch.device("cpu")
    return device


def run_layers(model, layers, ids, bs, device, store=None, each=None):
    """Stream `ids` through every decoder layer, layer-major; returns (last layer's outputs, calls).
    `each(-1, inputs)` sees the first layer's inputs, then `each(i, outputs)` every layer's outputs."""
    inps, calls = capture_inputs(model, layers, ids, bs, device, store)
    outs = torch.empty_like(inps)
    if each is not None:
        each(-1, inps)

    def one(i, layer):
        nonlocal inps, outs
        run_layer(layer, i, inps, calls, out=outs)
        inps, outs = outs, inps
        if each is not None:
            each(i, inps)

    for _ in walk(layers, device, one):
        pass
    return inps, calls


# --------------------------------------------------------------------------- deciding


def compute_device(model: nn.Module) -> torch.device:
    """Where a model computes: its stream device when layer-streamed, else where its weights are."""
    d = getattr(model, "osp_stream", None)
    return torch.device(d) if d is not None else next(model.parameters()).device


def is_streamed(model: nn.Module) -> bool:
    return getattr(model, "osp_stream", None) is not None


def host_available() -> int:
    """Bytes of host memory available now (MemAvailable), or the physical total where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_free(device) -> int:
    return torch.cuda.mem_get_info(torch.device(device))[0]


def margin(model_bytes: int) -> int:
    """GPU memory kept free besides the weights: activations, logits, the GPTQ Hessians and workspace."""
    return int(4 * GiB + 0.1 * model_bytes)


def decide(mode: str, model_bytes: int, device, gpu_bytes: int | None = None, host_bytes: int | None = None) -> bool:
    """Stream or not. `auto`: stream when the weights (in the target dtype) plus a margin do not fit the free GPU
    memory. A model that fits neither the GPU nor the host is a one-line error with the numbers."""
    if mode not in MODES:
        raise OspEvalError(f"--offload {mode!r}: choose auto, on or off")
    device = torch.device(device)
    if device.type != "cuda":
        return mode == "on"  # CPU "streaming" runs the same code with nothing to move (tests)
    if mode == "off":
        return False
    gpu_bytes = gpu_free(device) if gpu_bytes is None else gpu_bytes
    host_bytes = host_available() if host_bytes is None else host_bytes
    fits_gpu = model_bytes + margin(model_bytes) <= gpu_bytes
    if model_bytes > host_bytes and (mode == "on" or not fits_gpu):
        raise OspEvalError(
            f"the model does not fit: its weights need {model_bytes / GiB:.1f} GiB, the GPU has "
            f"{gpu_bytes / GiB:.1f} GiB free (with a {margin(model_bytes) / GiB:.1f} GiB margin) and the host "
            f"{host_bytes / GiB:.1f} GiB available: use a machine with more memory or a smaller --dtype")
    return mode == "on" or not fits_gpu


def check_fits_whole(nbytes: int, device, what: str, gpu_bytes: int | None = None) -> None:
    """For paths that need the whole model on one GPU (lighteval, vLLM): a one-line error with the numbers when
    the weights alone exceed the GPU's free memory, instead of a CUDA out-of-memory error mid-load."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    free = gpu_free(device) if gpu_bytes is None else gpu_bytes
    if nbytes > free:
        raise OspEvalError(f"{what} needs the whole model on one GPU: its weights need {nbytes / GiB:.1f} GiB and "
                           f"{device} has {free / GiB:.1f} GiB free; use a larger GPU or --devices N (several GPUs)")


def model_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in `dtype`, from its config alone (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in m.parameters())  # tied weights are counted once
    return n * torch.empty((), dtype=dtype).element_size()


def stream_model(model: nn.Module, layers, device) -> nn.Module:
    """Mark `model` (on the CPU) as layer-streamed on `device`: its shell goes to the device now, the layers
    visit it one at a time in `walk`."""
    place(shell(model, layers), device)
    model.osp_stream = str(device)
    return model
