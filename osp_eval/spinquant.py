"""SpinQuant: learn the residual rotation R1 and the per-layer head rotations R2 against the quantized
model's language-modelling loss (`osp-eval spinquant-train`), and save them as SpinQuant's `R.bin`.

Training (SpinQuant `optimize_rotation.py`): the model is prepared as `--rotate` does before R1/R2
(untie, optional embedding centring, norm fusion, R4 folded into down_proj), its weights stay frozen,
and R1/R2 (random Hadamards at first, float32 or wider) are the only parameters. Every forward rotates
the frozen weights with the current R1/R2 through the same pure functions that `--rotate` folds offline
(rotation.rotate_*, as torch parametrizations computed once per micro-batch), and the activation/K/V
fake quantizers osp_eval installs for inference run with straight-through rounding. Loss: next-token
cross-entropy. Optimiser: Cayley SGD on the Stiefel manifold (below), cosine learning rate.

Evaluation is the normal path: `--rotate --optimized_rotation_path R.bin` (GPTQ or RTN weights).

Memory (1.4B on one 80 GB GPU): bf16 frozen weights (2.8 GB), fp32 rotations, micro-batches of
`micro_batch_size` windows with gradient accumulation up to `train_batch_size`, and activation
checkpointing per decoder layer (on by default): a layer's rotated weights and quantizer intermediates
are recomputed in backward instead of being held for all layers at once.

Speed on a GPU (kernels fast/triton, bf16 weights): the R1 products W·R1 / R1ᵀ·W run as two TF32 tensor-core
GEMMs each (`split_rotations`: bf16 weights are exact in TF32 and R1 is split into two TF32 halves, so only
~2⁻²¹ of R1 is rounded away) and keep only the bf16 weight for backward, and the quantizers' gradient comes from
a Triton kernel (fp32 sums in another order); reference and auto keep fp32 GEMMs and autograd's gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .arch import base_role, get_adapter
from .config import INEXACT_KERNELS, QuantConfig
from .errors import OspEvalError


# --------------------------------------------------------------------------- Cayley SGD (pure math)
def cayley_sgd_step(r: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, lr: float,
                    momentum: float = 0.0, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Cayley SGD with momentum (Li, Fuxin & Todorovic 2020, Alg. 1; SpinQuant's SGDG).

    As SGDG, the rows of r form the orthonormal frame: X = rᵀ (n×p, XᵀX = I), G = ∂L/∂X = gradᵀ.
        M  <- μ·M − G                         momentum on the descent direction
        Ŵ  =  M·Xᵀ − ½·X·(Xᵀ·M·Xᵀ)
        W  =  Ŵ − Ŵᵀ                          skew-symmetric; W·X is M projected onto the tangent space at X
        α  =  min(lr, 1 / (‖W‖₁ + ε))         SGDG's step cap
        X' =  (I − α/2·W)⁻¹ (I + α/2·W) X     Cayley retraction: exactly orthogonal for any skew W
        M' =  W·X                             the buffer continues as a tangent vector
    The retraction is solved in closed form (SGDG iterates its fixed point 5 times and re-orthonormalises
    now and then), in float64, so R stays orthogonal to rounding error over many steps.
    Returns (new r in r's dtype, new momentum buffer [n, p] in float64).
    """
    x = r.detach().double().T
    m = -grad.detach().double().T
    if buf is not None and momentum:
        m = m + momentum * buf
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    w = w_hat - w_hat.T
    alpha = min(lr, 1.0 / (w.abs().sum(0).max().item() + eps))
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    x_new = torch.linalg.solve(eye - 0.5 * alpha * w, x + 0.5 * alpha * (w @ x))
    return x_new.T.to(r.dtype), w @ x


class CayleySGD(torch.optim.Optimizer):
    """Cayley SGD for square orthogonal parameters (a torch optimizer, so lr schedulers work)."""

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1:
            raise OspEvalError(f"Cayley SGD needs lr > 0 and 0 <= momentum < 1 (got lr={lr}, momentum={momentum})")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                new, state["momentum_buffer"] = cayley_sgd_step(
                    p, p.grad, state.get("momentum_buffer"), group["lr"], group["momentum"])
                p.copy_(new)
        return loss


def cosine_lr(step: int, steps: int) -> float:
    """HF's cosine schedule without warm-up (what SpinQuant's Trainer uses): factor at optimizer step `step`."""
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


# --------------------------------------------------------------------------- rotations and the file layout
class Rotations(nn.Module):
    """The trainable rotations: R1 [hidden, hidden] and one R2 [head_dim, head_dim] per layer."""

    def __init__(self, r1: torch.Tensor, r2s: list[torch.Tensor]):
        super().__init__()
        self.r1 = nn.Parameter(r1.clone())
        self.r2 = nn.ParameterList([nn.Parameter(r.clone()) for r in r2s])

    def state(self) -> dict[str, torch.Tensor]:
        """SpinQuant's R.bin layout."""
        d = {"R1": self.r1.detach().cpu().clone()}
        for i, r in enumerate(self.r2):
            d[f"model.layers.{i}.self_attn.R2"] = r.detach().cpu().clone()
        return d


def save_rotations(path: str | Path, state: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """R.bin as a plain dict of tensors (others' loaders read it); metadata goes next to it as PATH.json."""
    from .provenance import torch_save_atomic, write_json_atomic

    path = torch_save_atomic(state, path)
    if meta is not None:  # written after R.bin: a sidecar always describes a complete file
        write_json_atomic(f"{path}.json", meta)
    return path


# --------------------------------------------------------------------------- the training model
class _Rotated(nn.Module):
    """A parametrization: the frozen tensor -> fn(tensor), recomputed (differentiably) on each access."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w)


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x = hi + lo exactly, hi with TF32's 10 mantissa bits (the low 13 bits cleared): lo is what is left."""
    hi = (x.view(torch.int32) & ~0x1FFF).view(torch.float32)
    return hi, x - hi


def _mm_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for fp32 a exact in TF32 (bf16 values): a·b_hi + a·b_lo, two TF32 tensor-core GEMMs whose products are
    exact; only lo's own TF32 rounding is lost (~2⁻²¹ of b), near fp32 accuracy at a fraction of an fp32 GEMM."""
    from .kernels import tf32_matmuls

    hi, lo = tf32_split(b)
    with tf32_matmuls(True):
        return torch.addmm(a @ hi, a, lo)


class _FrozenRotation(torch.autograd.Function):
    """w·r for a frozen bf16 weight w and a trainable fp32 rotation r, on TF32 tensor cores (see _mm_split).
    Backward saves only w itself (no fp32 copy) and returns dL/dr = wᵀ·G, G split the same way."""

    @staticmethod
    def forward(ctx, w, r):
        ctx.save_for_backward(w)
        return _mm_split(w.float(), r)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return None, _mm_split(w.float().T, grad.contiguous()) if ctx.needs_input_grad[1] else None


def split_rotations(weight: torch.Tensor, rdtype: torch.dtype, kernels: str = "auto") -> bool:
    """Whether this model's R1 products run as split-TF32 GEMMs (`_FrozenRotation`): bf16 weights on a GPU unless
    kernels is "reference" (products exact, fp32 sums; the weight rotations dominate a large model's training
    step); otherwise w·r in fp32."""
    return (kernels in INEXACT_KERNELS and weight.is_cuda and weight.dtype == torch.bfloat16
            and rdtype == torch.float32)


def _parametrize(module: nn.Module, name: str, fn, rdtype: torch.dtype, recompute: bool = False) -> None:
    # fn takes the frozen tensor in the model's dtype and rotates in the rotations' dtype (fp32 for a bf16 model);
    # the model's dtype is handed back.
    rotated = lambda w: fn(w).to(w.dtype)  # noqa: E731
    if recompute:
        # Autograd would keep each weight's fp32 copy (the rotation's matmul input) until the backward pass:
        # twice the model's bf16 size. Checkpointed, only the frozen weight itself is referenced and the fp32
        # copy is recomputed, one weight at a time, in the backward pass: the same values, the same gradients.
        rotated = partial(checkpoint, rotated, use_reentrant=False)
    parametrize.register_parametrization(module, name, _Rotated(rotated))


def _weight_ste(fn, cfg: QuantConfig):
    """RTN weights during training: round the rotated weight, pass gradients straight through."""
    from .quant import fake_quant_weight

    def quantized(w):
        w = fn(w)
        q = fake_quant_weight(w.detach(), cfg.w_bits, cfg.w_groupsize, not cfg.w_asym, cfg.w_clip, cfg.kernels)
        return w + (q - w.detach())

    return quantized


def _set_ste(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "osp_input"):
            m.osp_input.act = dataclasses.replace(m.osp_input.act, ste=True)
        if hasattr(m, "osp_output"):
            m.osp_output.act = dataclasses.replace(m.osp_output.act, ste=True)
        if getattr(m, "osp_k", None) is not None:
            m.osp_k = dataclasses.replace(m.osp_k, act=dataclasses.replace(m.osp_k.act, ste=True))


def training_config(cfg: QuantConfig) -> QuantConfig:
    """What the model computes while R1/R2 train: cfg's activations and KV cache; weights at 16 bits when
    GPTQ follows (SpinQuant's recipe), RTN (straight-through) when RTN follows."""
    cfg = cfg.replace(rotate=True, rotate_down_proj=False)
    if cfg.o_proj_input != "per_head":
        raise OspEvalError("spinquant-train learns the per-head R2: use --o_proj_input per_head (the QuaRot-paper "
                           "cross-head Hadamard replaces R2)")
    if cfg.w_method == "gptq":
        cfg = cfg.replace(w_bits=16)
    return cfg.validate()


def prepare_training_model(model: nn.Module, cfg: QuantConfig, r1: torch.Tensor | None = None,
                           r2s: list[torch.Tensor] | None = None, recompute_rotations: bool = False) -> Rotations:
    """Turn a freshly loaded model into the training model, in place; return its trainable Rotations.

    `recompute_rotations`: keep no fp32 copy of the weights for the backward pass (recompute it there; same
    gradients bit for bit, one more rotation per weight and step): for models whose fp32 weights do not fit.

    R1/R2 default to what `--rotate` would draw (random Hadamards seeded by cfg.rotation_seed, or the
    file in cfg.optimized_rotation_path: a warm start).
    """
    from .apply import check_compatible, install_activation_quant, install_kv_quant
    from .rotation import (OnlineHadamard, draw_rotations, fold_input_hadamard, prepare_for_r1, rotate_o_cols,
                           rotate_out_norms, rotate_reader, rotate_v_bias, rotate_v_rows, rotate_writer)

    cfg = training_config(cfg)
    ad = get_adapter(model)
    ad.prepare(model)
    dims = check_compatible(model, cfg)
    weight = ad.embed(model).weight
    rdtype = torch.promote_types(torch.float32, weight.dtype)  # fp32 for bf16 models, fp64 for fp64 ones
    if r1 is None or r2s is None:
        r1, r2s = draw_rotations(cfg, dims, weight.device)
    rot = Rotations(r1.to(weight.device, rdtype), [r.to(weight.device, rdtype) for r in r2s]).requires_grad_(True)

    model.requires_grad_(False)
    prepare_for_r1(model, cfg)
    rotate_out_norms(model, lambda: rot.r1)  # post-norm families: the gain matrix follows the trainable R1
    hd = dims.head_dim
    wq = (lambda fn: _weight_ste(fn, cfg)) if cfg.w_bits < 16 else (lambda fn: fn)
    par = partial(_parametrize, recompute=recompute_rotations)
    if split_rotations(weight, rdtype, cfg.kernels):
        reader = lambda w: _FrozenRotation.apply(w, rot.r1)  # noqa: E731
        writer = lambda w: _FrozenRotation.apply(w.T, rot.r1).T.contiguous()  # R1ᵀ·W = (Wᵀ·R1)ᵀ  # noqa: E731
    else:
        reader = lambda w: rotate_reader(w.to(rdtype), rot.r1)  # noqa: E731
        writer = lambda w: rotate_writer(w.to(rdtype), rot.r1)  # noqa: E731
    par(ad.embed(model), "weight", reader, rdtype)
    par(ad.lm_head(model), "weight", reader, rdtype)
    for i, layer in enumerate(ad.layers(model)):
        lin = ad.linears(layer)
        r2 = rot.r2[i]
        for role, m in lin.items():
            base = base_role(role)
            if base == "down":
                fold_input_hadamard(m)  # R4's offline half; commutes with R1ᵀ on the other side
            if base in ("q", "k", "gate", "up"):
                par(m, "weight", wq(reader), rdtype)
            elif base in ("o", "down"):
                o_cols = (lambda w, r2=r2: rotate_o_cols(writer(w), r2, hd)) if base == "o" else writer
                par(m, "weight", wq(o_cols), rdtype)
                if m.bias is not None:
                    par(m, "bias", lambda b: rotate_writer(b.to(rdtype), rot.r1), rdtype)
        par(lin["v"], "weight", wq(lambda w, r2=r2: rotate_v_rows(reader(w), r2, hd)), rdtype)
        if lin["v"].bias is not None:
            par(lin["v"], "bias", lambda b, r2=r2: rotate_v_bias(b.to(rdtype), r2, hd), rdtype)
        for router in ad.routers(layer):  # full precision: no weight quantizer
            par(router, "weight", reader, rdtype)
    install_activation_quant(model, cfg, {"down": OnlineHadamard(cfg.fp32_had)})
    install_kv_quant(model, cfg)
    _set_ste(model)
    for m in model.modules():  # rotation training is deterministic: no dropout in train mode
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    model.osp_config = cfg
    return rot


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy over windows (each window weighs the same)."""
    device = next(model.parameters()).device
    total = 0.0
    for mb in windows.split(batch_size):
        mb = mb.to(device)
        total += model(input_ids=mb, labels=mb, use_cache=False).loss.item() * len(mb)
    return total / len(windows)


def _materialize(model: nn.Module) -> None:
    """Compute every rotated tensor once (inside `parametrize.cached()`), outside the checkpointed layers, so
    activation checkpointing recomputes only the layer, not the rotations."""
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for name in m.parametrizations:
                getattr(m, name)


def train_rotations(model: nn.Module, rot: Rotations, windows: torch.Tensor, *, steps: int = 100, lr: float = 1.5,
                    momentum: float = 0.0, batch_size: int = 8, micro_batch_size: int | None = None,
                    checkpointing: bool = True, progress: bool = True, start_step: int = 0,
                    optimizer_state: dict | None = None, max_seconds: float | None = None) -> list[float]:
    """Cayley SGD on `rot` for `steps` steps of `batch_size` windows (taken in order, cycling); returns the
    loss of every step run. `model` is a training model from prepare_training_model. `micro_batch_size` (default:
    the whole batch in one forward) trades memory for speed: a small model's step is launch-bound on a GPU.

    Stopping and resuming: `max_seconds` ends the run after the first step that finishes past it; `start_step`
    (with the rotations and, for momentum > 0, `optimizer_state` of the stopped run) continues it: the schedule and
    the windows go on where they were, so the pieces equal one uninterrupted run. The optimizer's state at the end
    ({"momentum_buffers": [...]}, float64) is left on `rot.optimizer_state`."""
    micro_batch_size = micro_batch_size or batch_size
    if steps <= 0 or batch_size <= 0 or micro_batch_size <= 0:
        raise OspEvalError("--steps, --train_batch_size and --micro_batch_size must be positive")
    if not 0 <= start_step < steps:
        raise OspEvalError(f"cannot continue at step {start_step} of {steps}")
    device = next(model.parameters()).device
    opt = CayleySGD(rot.parameters(), lr=lr, momentum=momentum)
    params = list(rot.parameters())
    if optimizer_state is not None:  # set directly: load_state_dict would cast the float64 buffers to fp32
        for p, buf in zip(params, optimizer_state["momentum_buffers"]):
            if buf is not None:
                opt.state[p]["momentum_buffer"] = buf.to(p.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(start_step + s, steps))
    t_start = time.perf_counter()
    if checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF checkpoints decoder layers only in train mode
    losses = []
    bar = tqdm(range(start_step, steps), desc="SpinQuant", disable=not progress, initial=start_step, total=steps)
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # callers (lighteval, eval loops) may have switched autograd off globally
    try:
        for step in bar:
            idx = torch.arange(step * batch_size, (step + 1) * batch_size) % len(windows)
            batch = windows[idx]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for mb in batch.split(micro_batch_size):
                mb = mb.to(device)
                with parametrize.cached():  # the rotated weights once per micro-batch, not once per access
                    _materialize(model)
                    loss = model(input_ids=mb, labels=mb, use_cache=False).loss * (len(mb) / len(batch))
                    loss.backward()
                total += loss.item()
            opt.step()
            sched.step()
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{sched.get_last_lr()[0]:.3g}")
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                break
    finally:
        rot.optimizer_state = {"momentum_buffers": [opt.state[p].get("momentum_buffer") for p in params]}
        torch.set_grad_enabled(grad_mode)
        model.eval()
        if checkpointing and getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
    return losses


# --------------------------------------------------------------------------- the entry point
def _peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def spinquant_train(model_name: str, cfg: QuantConfig, *, save_path: str = "R.bin", steps: int = 100,
                    lr: float = 1.5, momentum: float = 0.0, nsamples: int = 800, seqlen: int = 2048,
                    batch_size: int = 8, micro_batch_size: int | None = None, checkpointing: bool = True, gguf_file=None,
                    dtype="auto", device=None, data_dir=None, progress: bool = True,
                    identity: dict | None = None, recompute_rotations: bool = False,
                    max_seconds: float | None = None, resume: bool = False) -> dict:
    """Load `model_name`, learn R1/R2 for `cfg` on calibration windows (cfg.calib_data), save R.bin and
    R.bin.json (metadata: losses, time, peak memory, provenance, and `identity` when a cache keys on it).
    Returns the metadata. Every input is checked before the model loads.

    `max_seconds`: stop after the first step that ends past it (a job with a time limit); R.bin then holds the
    rotations so far, its sidecar says `"complete": false` and `steps_done`, and carries no `identity`, so no
    cache ever takes it for the finished run. `resume`: continue such a run from save_path (the same model,
    data and recipe, checked); the pieces give the same rotations as one uninterrupted run."""
    from .data import calibration_ids, calibration_text
    from .models import load_model
    from .pipeline import check_positive, preflight
    from .provenance import check_writable, now, provenance

    started = now()
    check_positive(steps=steps, train_nsamples=nsamples, train_seqlen=seqlen, train_batch_size=batch_size,
                   micro_batch_size=micro_batch_size)
    if max_seconds is not None and max_seconds < 0:
        raise OspEvalError(f"--max_train_seconds must be >= 0 (got {max_seconds})")
    train_cfg = training_config(cfg)
    inputs = preflight(model_name, train_cfg, gguf_file=gguf_file, dtype=dtype, device=device, data_dir=data_dir)
    maxpos = getattr(inputs.config, "max_position_embeddings", None)
    if maxpos is not None and seqlen > maxpos:
        raise OspEvalError(f"--train_seqlen {seqlen} exceeds this model's max_position_embeddings ({maxpos})")
    text = calibration_text(cfg.calib_data, data_dir)
    check_writable(Path(save_path).parent, "--save_path's folder")
    run = {"model_fingerprint": inputs.fingerprint, "training_config": train_cfg.to_dict(),
           "init": cfg.optimized_rotation_path or f"random Hadamard, seed {cfg.rotation_seed}", "steps": steps,
           "lr": lr, "momentum": momentum, "batch_size": batch_size}
    before = _resume_point(save_path, run) if resume else None
    if before is not None and before.get("complete"):  # nothing left to train
        return before | {"rotation_path": str(save_path)}
    model, tok = load_model(model_name, gguf_file, dtype, inputs.device)
    windows, calib = calibration_ids(tok, cfg.calib_data, nsamples, seqlen, cfg.seed, data_dir, text=text)
    if before is not None and before["calibration"] != calib:
        raise OspEvalError(f"--resume: {save_path} was trained on other calibration windows ({before['calibration']}"
                           f" vs {calib}); use the same --calib_data, --train_nsamples, --train_seqlen and --seed")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rot, trained = train_segment(model, cfg, windows, save_path, before, steps=steps, lr=lr, momentum=momentum,
                                 batch_size=batch_size, micro_batch_size=micro_batch_size,
                                 checkpointing=checkpointing, progress=progress,
                                 recompute_rotations=recompute_rotations, max_seconds=max_seconds)
    complete = trained["complete"]
    meta = {
        "kind": "spinquant_rotations",
        "model": model_name,
        "gguf_file": gguf_file,
        "config": cfg.to_dict(),
        "training_config": train_cfg.to_dict(),
        "init": cfg.optimized_rotation_path or f"random Hadamard, seed {cfg.rotation_seed}",
        "steps": steps, "lr": lr, "schedule": "cosine, no warm-up", "momentum": momentum,
        "batch_size": batch_size, "micro_batch_size": micro_batch_size or batch_size, "checkpointing": checkpointing,
        "recompute_rotations": recompute_rotations,
        "calibration": calib,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "rotation_dtype": str(rot.r1.dtype).replace("torch.", ""),
        **trained,  # losses, steps_done, complete, segment_seconds, train_seconds
        **_peak_memory(),
        "model_fingerprint": inputs.fingerprint,
        "identity": identity if complete else None,
        "provenance": provenance(started),
    }
    optim = Path(f"{save_path}.optim")
    if momentum and not complete:  # the momentum buffers a later --resume needs
        from .provenance import torch_save_atomic

        torch_save_atomic(rot.optimizer_state, optim)
    meta["rotation_path"] = str(save_rotations(save_path, rot.state(), meta))
    if complete and optim.exists():
        optim.unlink()
    return meta


def train_segment(model: nn.Module, cfg: QuantConfig, windows: torch.Tensor, rotation_path, before: dict | None, *,
                  steps: int, lr: float = 1.5, momentum: float = 0.0, batch_size: int = 8,
                  micro_batch_size: int | None = None, checkpointing: bool = True, progress: bool = True,
                  recompute_rotations: bool = False, max_seconds: float | None = None) -> tuple[Rotations, dict]:
    """Prepare `model` for training and train R1/R2 from the start, or, given `before` (the sidecar of a stopped
    run), from where it ended (its R.bin at rotation_path; for momentum > 0 also rotation_path.optim). Returns the
    rotations and the run so far: losses of every step, steps_done, complete, segment_seconds, train_seconds."""
    r1 = r2s = opt_state = None
    t0 = time.perf_counter()
    if before is not None:
        from .rotation import load_rotations

        r1, r2s = load_rotations(str(rotation_path), get_adapter(model).dims(model))
        if momentum:
            opt_state = torch.load(f"{rotation_path}.optim", weights_only=True)
    rot = prepare_training_model(model, cfg, r1, r2s, recompute_rotations=recompute_rotations)
    start = before["steps_done"] if before is not None else 0
    new = train_rotations(model, rot, windows, steps=steps, lr=lr, momentum=momentum, batch_size=batch_size,
                          micro_batch_size=micro_batch_size, checkpointing=checkpointing, progress=progress,
                          start_step=start, optimizer_state=opt_state, max_seconds=max_seconds)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    segments = (before.get("segment_seconds", [before["train_seconds"]]) if before else []) + [
        time.perf_counter() - t0]
    return rot, {"losses": (before["losses"] if before is not None else []) + new, "steps_done": start + len(new),
                 "complete": start + len(new) == steps, "segment_seconds": segments, "train_seconds": sum(segments)}


def _resume_point(save_path: str, run: dict) -> dict:
    """The sidecar of the stopped run at save_path, after checking it is this run."""
    import json

    side = Path(f"{save_path}.json")
    if not side.is_file() or not Path(save_path).is_file():
        raise OspEvalError(f"--resume: no stopped run at {save_path} (or its {side.name}); start without --resume")
    meta = json.loads(side.read_text())
    if "steps_done" not in meta:  # written before resumable runs existed: always complete
        meta |= {"steps_done": meta.get("steps"), "complete": True}
    for key, want in json.loads(json.dumps(run, default=str)).items():  # compared as the sidecar stores them
        if meta.get(key) != want:
            raise OspEvalError(f"--resume: {save_path} is a different run ({key}: {meta.get(key)!r} there, {want!r} "
                               "now); use the same model and training flags, or another --save_path")
    if run["momentum"] and not meta.get("complete") and not Path(f"{save_path}.optim").is_file():
        raise OspEvalError(f"--resume: {save_path}.optim (the momentum buffers) is missing")
    return meta


def _cli(args) -> None:
    from .cli_args import config_from_args

    args.rotate = True  # spinquant-train always rotates; --optimized_rotation_path is then a warm start
    cfg = config_from_args(args, default_method="gptq")
    m = spinquant_train(args.model, cfg, save_path=args.save_path, steps=args.steps, lr=args.lr,
                        momentum=args.momentum, nsamples=args.train_nsamples, seqlen=args.train_seqlen,
                        batch_size=args.train_batch_size, micro_batch_size=args.micro_batch_size,
                        checkpointing=args.gradient_checkpointing, gguf_file=args.gguf_file, dtype=args.dtype,
                        device=args.device, data_dir=args.data_dir, progress=not args.no_progress,
                        recompute_rotations=args.recompute_rotations, max_seconds=args.max_train_seconds,
                        resume=args.resume)
    mem = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k.startswith("peak_"))
    print(f"spinquant W{cfg.w_bits}A{cfg.a_bits}KV{cfg.k_bits} {args.model}: loss {m['losses'][0]:.4f} -> "
          f"{m['losses'][-1]:.4f} after {m['steps_done']} of {m['steps']} steps [{m['train_seconds']:.1f}s, {mem}]")
    print(f"rotations: {m['rotation_path']} (metadata: {m['rotation_path']}.json)")
    if not m["complete"]:
        print("stopped at --max_train_seconds: NOT finished; continue with the same command plus --resume")


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `spinquant-train` on an argparse subparsers object."""
    from .cli_args import BOOL, add_model_args, add_quant_args, positive_int

    p = subparsers.add_parser(
        "spinquant-train", help="learn SpinQuant R1/R2 rotations (Cayley SGD), save R.bin",
        description="Learn R1/R2 for the given W/A/KV quantization (weights stay 16-bit while training when GPTQ "
                    "follows), save SpinQuant's R.bin; evaluate with `ppl --rotate --optimized_rotation_path R.bin`. "
                    "Here --optimized_rotation_path is a warm start; training windows come from --calib_data.")
    add_model_args(p)
    add_quant_args(p)
    t = p.add_argument_group("rotation training (SpinQuant: 100 steps of 8 windows of 2048, lr 1.5, cosine)")
    t.add_argument("--steps", type=positive_int, default=100)
    t.add_argument("--lr", type=float, default=1.5)
    t.add_argument("--momentum", type=float, default=0.0, help="Cayley SGD momentum (SpinQuant: 0)")
    t.add_argument("--train_nsamples", type=positive_int, default=800, help="calibration windows (from --calib_data)")
    t.add_argument("--train_seqlen", type=positive_int, default=2048)
    t.add_argument("--train_batch_size", type=positive_int, default=8, help="windows per optimizer step")
    t.add_argument("--micro_batch_size", type=positive_int, default=None,
                   help="windows per forward, with gradient accumulation (default: the whole --train_batch_size)")
    t.add_argument("--gradient_checkpointing", action=BOOL, default=True, help="recompute each decoder layer")
    t.add_argument("--recompute_rotations", action=BOOL, default=False,
                   help="keep no fp32 copy of the weights for the backward pass, recompute it there (same gradients; "
                        "less memory for large models, one more rotation per weight and step)")
    t.add_argument("--save_path", default="R.bin", help="where R.bin goes (metadata: SAVE_PATH.json)")
    t.add_argument("--max_train_seconds", type=float, default=None,
                   help="stop after the first step that ends past this many seconds and save a resumable, unfinished "
                        "R.bin (its sidecar says complete: false)")
    t.add_argument("--resume", action="store_true",
                   help="continue the unfinished run at --save_path (same model, data and training flags, checked)")
    p.set_defaults(func=_cli)
    return p
