"""WikiText-2 perplexity exactly as the reference: non-overlapping windows, tail dropped,
per-window mean token cross-entropy (in the logits' dtype, averaged in fp32), PPL = exp(mean)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import OspEvalError


def make_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[nwindows, seqlen]: ⌊N/seqlen⌋ non-overlapping windows, the tail dropped."""
    n = ids.numel() // seqlen
    if n == 0:
        raise OspEvalError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def check_seqlen(config, seqlen: int) -> None:
    """Fail early when the windows are longer than the model's positions (takes a model config)."""
    maxpos = getattr(config, "max_position_embeddings", None)
    if maxpos is not None and seqlen > maxpos:
        raise OspEvalError(
            f"--seqlen {seqlen} exceeds this model's max_position_embeddings ({maxpos}): pass --seqlen {maxpos} "
            "or smaller"
        )


def _window_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per window, fp32, on the logits' device (moved to the CPU once, after the
    last batch: no sync per batch). Per-token losses stay in the logits' dtype (bf16 in the reference), then
    average in fp32."""
    logits = logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return loss.view(len(batch), -1).float().mean(1)


def graphed_forward(model, batch: torch.Tensor):
    """The model's forward on `batch`'s shape as a CUDA graph (no Python, hooks or launches per replay), or None.
    Used only after one replay gave the eager forward's logits bit for bit on `batch`; a capture that fails or
    differs is a warning, and the eager forward stays."""
    import warnings

    try:
        static = batch.clone()
        eager = model(input_ids=batch, use_cache=False).logits.clone()  # also runs every one-time check first
        side = torch.cuda.Stream(batch.device)
        side.wait_stream(torch.cuda.current_stream(batch.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            model(input_ids=static, use_cache=False)
        torch.cuda.current_stream(batch.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(input_ids=static, use_cache=False).logits
        graph.replay()
        if not torch.equal(logits, eager):
            diff = (logits.float() - eager.float()).abs().max().item()
            warnings.warn(f"osp_eval: the CUDA-graph forward differs from the eager one (max |Δlogit| {diff:.3g}); "
                          "evaluating eagerly")
            return None
    except Exception as e:  # e.g. an op that cannot be captured
        warnings.warn(f"osp_eval: no CUDA graph for this model ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "evaluating eagerly")
        return None

    def run(b: torch.Tensor) -> torch.Tensor:
        static.copy_(b)
        graph.replay()
        return logits  # overwritten by the next replay: use before calling again

    return run


def compiled_forward(model, batch: torch.Tensor):
    """`torch.compile` of the forward for `batch`'s shape, and what it did: compile seconds, graph breaks and the
    largest |Δlogit| against the eager forward on `batch` (Inductor fuses the norms, RoPE and casts, so the values
    differ from eager by float rounding; the record says by how much)."""
    import torch._dynamo

    eager = model(input_ids=batch, use_cache=False).logits.float()
    torch._dynamo.utils.counters.clear()
    forward = torch.compile(model, dynamic=False)
    t0 = time.perf_counter()
    logits = forward(input_ids=batch, use_cache=False).logits.float()
    info = {"compile_seconds": time.perf_counter() - t0,
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            "max_abs_logit_diff_vs_eager": (logits - eager).abs().max().item()}

    def run(b: torch.Tensor) -> torch.Tensor:
        return forward(input_ids=b, use_cache=False).logits

    return run, info


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                cuda_graphs: bool = False, compile: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (fp32 tensor [nwindows]). `cuda_graphs`: full batches replay
    a captured CUDA graph of the forward (checked bit for bit against the eager forward first; see
    `graphed_forward`); sets `model.osp_cuda_graphs` to whether they did. `compile`: full batches run through
    `torch.compile` (`compiled_forward`; a last, smaller batch runs eagerly instead of compiling a second
    shape); sets `model.osp_compiled` to what it did."""
    from .offload import is_streamed

    model.osp_cuda_graphs, model.osp_compiled = False, None
    if is_streamed(model):
        if compile:
            raise OspEvalError("--compile needs the whole model on one device: drop --compile or use --offload off")
        return streamed_window_nlls(model, windows, batch_size, progress)
    device = next(model.parameters()).device
    run = None
    if cuda_graphs and device.type == "cuda" and len(windows) >= batch_size:
        run = graphed_forward(model, windows[:batch_size].to(device))
        model.osp_cuda_graphs = run is not None
    elif compile and len(windows) >= batch_size:
        if progress:  # compilation takes seconds to minutes before the first batch
            tqdm.write("osp-eval: compiling the forward (torch.compile)")
        run, model.osp_compiled = compiled_forward(model, windows[:batch_size].to(device))
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc="PPL", disable=not progress, leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = run(batch) if run is not None and len(batch) == batch_size else model(input_ids=batch,
                                                                                          use_cache=False).logits
        out.append(_window_loss(logits, batch))
    return torch.cat(out).cpu()


@torch.no_grad()
def streamed_window_nlls(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """`window_nlls` layer-major (offload.walk): every window enters layer i before any enters layer i+1, in the
    same batches as the normal path, so each layer call and the final head see the same inputs: the same NLLs.
    The hidden states of all windows stay on the device when two copies fit beside a margin, else on the CPU."""
    from .arch import get_adapter
    from .offload import compute_device, head, run_layers, storage

    device = compute_device(model)
    layers = get_adapter(model).layers(model)
    store = storage(device, windows.numel() * model.config.hidden_size * next(model.parameters()).element_size())
    bar = tqdm(total=len(layers), desc="PPL (streamed)", disable=not progress, leave=False)
    stamps = []

    def each(i, h):  # per-layer times (one sync per layer: the next layer's copy is already queued)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        bar.update(i >= 0)

    hs, _ = run_layers(model, layers, windows, batch_size, device, store, each)
    bar.close()
    model.osp_stream_stats = {"store": str(store), "layer_seconds": [b - a for a, b in zip(stamps, stamps[1:])]}
    out = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        out.append(_window_loss(head(model, layers, batch, hs[i : i + batch_size]).logits, batch))
    return torch.cat(out).cpu()


def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 4, max_windows: int | None = None,
               progress: bool = True, cuda_graphs: bool = False, compile: bool = False) -> dict:
    """PPL record of `ids` split into windows. eval_seconds includes a `compile`'s compilation (also recorded
    apart, under "compiled")."""
    if cuda_graphs and compile:
        raise OspEvalError("--cuda_graphs and --compile are alternatives: pass one of them")
    check_seqlen(model.config, seqlen)
    windows = make_windows(ids, seqlen, max_windows)
    t0 = time.perf_counter()
    nlls = window_nlls(model, windows, batch_size, progress, cuda_graphs, compile)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {**ppl_record(nlls, windows, ids, seqlen, max_windows, time.perf_counter() - t0),
            "cuda_graphs": model.osp_cuda_graphs, **({"compiled": model.osp_compiled} if compile else {})}


def ppl_record(nlls: torch.Tensor, windows: torch.Tensor, ids: torch.Tensor, seqlen: int, max_windows: int | None,
               seconds: float) -> dict:
    """The PPL result fields, from per-window mean NLLs (shared by the Transformers and vLLM backends)."""
    mean = nlls.mean().item()
    ppl = math.exp(mean) if mean < 709 else math.inf  # math.exp raises past ~709; NaN stays NaN
    return {
        "ppl": ppl,
        "ppl_finite": math.isfinite(ppl),
        "ppl_value": repr(ppl),  # "nan" / "inf" survive in JSON, where the number itself becomes null
        "nonfinite_windows": int((~torch.isfinite(nlls)).sum()),
        "nwindows": len(windows),
        "full_split": max_windows is None or len(windows) == ids.numel() // seqlen,
        "windows_available": ids.numel() // seqlen,
        "tokens": int(windows.numel()),
        "text_tokens": int(ids.numel()),
        "seqlen": seqlen,
        "eval_seconds": seconds,
        "tokens_per_second": windows.numel() / seconds if seconds > 0 else None,
    }
