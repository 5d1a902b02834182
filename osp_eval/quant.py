"""Fake quantizers: pure tensor functions (quantize, then dequantize back to the input dtype).

Conventions follow the reference (SpinQuant/OSP `utils/quant_utils.py`) except its known defect:
the asymmetric weight zero point is honoured here.
"""

from __future__ import annotations

import torch

# MSE clip search of the reference: shrink factors p = 1 - i/100 for i < 80, error sum |q - w|^2.4.
CLIP_GRID = 100
CLIP_MAXSHRINK = 0.8
CLIP_NORM = 2.4
CLIP_FACTORS = tuple(1 - i / CLIP_GRID for i in range(int(CLIP_MAXSHRINK * CLIP_GRID)))  # p, first p = 1.0


def _maxq(bits: int, sym: bool) -> int:
    return 2 ** (bits - 1) - 1 if sym else 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (straight-through): gradients still reach x and the scale."""
    return x + (torch.round(x) - x).detach()


def quantize_dequant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, sym: bool,
                     ste: bool = False):
    """Round x onto the grid given by scale (and zero for asym) and map it back."""
    rnd = round_ste if ste else torch.round
    if sym:
        maxq = _maxq(bits, True)
        return torch.clamp(rnd(x / scale), -(maxq + 1), maxq) * scale
    maxq = _maxq(bits, False)
    return (torch.clamp(rnd(x / scale) + zero, 0, maxq) - zero) * scale


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    """Scale and zero point from a range that already contains 0 (weights)."""
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax).clamp(min=1e-5)
        return xmax / _maxq(bits, True), torch.zeros_like(xmax)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin).clamp(min=1e-5) / _maxq(bits, False)
    return scale, torch.round(-xmin / scale)


def weight_range(w: torch.Tensor):
    """Per-row (min, max) of a 2-D fp32 weight, widened to contain 0."""
    zeros = torch.zeros(w.shape[0], device=w.device)
    return torch.minimum(w.amin(1), zeros), torch.maximum(w.amax(1), zeros)


def clip_candidates(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    """Scale and zero of every clip-search candidate ([rows, len(CLIP_FACTORS)] each): the values the loop of
    weight_qparams computes for p * xmin, p * xmax (a tensor times a Python float multiplies by float32(p))."""
    p = torch.tensor(CLIP_FACTORS, dtype=torch.float32, device=xmin.device)
    return _scale_zero(xmin[:, None] * p, xmax[:, None] * p, bits, sym)


def weight_qparams(w: torch.Tensor, bits: int, sym: bool = True, clip_search: bool = False,
                   kernels: str = "reference"):
    """Per-row scale and zero ([rows, 1] each, fp32) for a 2-D weight, optionally with the MSE clip search.

    `kernels` "triton"/"auto": the clip search runs as one Triton kernel (kernels.weight_clip_search_triton):
    the same candidates and selection; only the error sums round differently (see there).
    """
    w = w.float()
    if clip_search and kernels != "reference":
        from . import kernels as K

        if K.use_clip_kernel(kernels, w):
            return K.weight_clip_search_triton(w, bits, sym)
    xmin, xmax = weight_range(w)
    scale, zero = _scale_zero(xmin, xmax, bits, sym)
    if clip_search:
        best = torch.full_like(scale, float("inf"))
        for p in CLIP_FACTORS:
            s1, z1 = _scale_zero(p * xmin, p * xmax, bits, sym)
            err = (quantize_dequant(w, s1[:, None], z1[:, None], bits, sym) - w).abs_().pow_(CLIP_NORM).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale[:, None], zero[:, None]


def fake_quant_weight(
    w: torch.Tensor, bits: int, groupsize: int = -1, sym: bool = True, clip_search: bool = False,
    kernels: str = "reference",
) -> torch.Tensor:
    """Round-to-nearest weight fake quantization, per output channel or per group of input columns
    (`kernels`: where the clip search runs, see weight_qparams)."""
    if bits >= 16:
        return w
    rows, cols = w.shape
    if groupsize > 0:
        if cols % groupsize:
            raise ValueError(f"weight groupsize {groupsize} does not divide in_features {cols}")
        flat = w.reshape(rows * cols // groupsize, groupsize)
    else:
        flat = w
    scale, zero = weight_qparams(flat, bits, sym, clip_search, kernels)
    q = quantize_dequant(flat.float(), scale, zero, bits, sym)
    return q.reshape(rows, cols).to(w.dtype)


def fake_quant_act(
    x: torch.Tensor,
    bits: int,
    sym: bool = False,
    clip_ratio: float = 1.0,
    groupsize: int = -1,
    zero_in_range: bool | None = None,
    ste: bool = False,
) -> torch.Tensor:
    """Dynamic activation fake quantization over the last dim: per token, or per token and group.

    `ste`: differentiable through a straight-through rounding (SpinQuant's rotation training); same values.

    The per-token path always keeps 0 inside the range (as the reference); the groupwise path uses the
    group's own min/max unless `zero_in_range` is set (the reference's K path does that per head).
    Computed in fp32 and cast back, as the reference does through its fp32 scale.
    """
    if bits >= 16:
        return x
    dtype, shape = x.dtype, x.shape
    if zero_in_range is None:
        zero_in_range = groupsize <= 0
    if groupsize > 0:
        if shape[-1] % groupsize:
            raise ValueError(f"activation groupsize {groupsize} does not divide dimension {shape[-1]}")
        x = x.reshape(*shape[:-1], shape[-1] // groupsize, groupsize)
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if zero_in_range:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    lo, hi = lo * clip_ratio, hi * clip_ratio
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        scale = amax / _maxq(bits, True)
        scale = torch.where(amax == 0, torch.ones_like(scale), scale)
        out = quantize_dequant(x, scale, None, bits, True, ste)
    else:
        if zero_in_range:  # an all-zero row gets the range [-1, 1]
            both_zero = (lo == 0) & (hi == 0)
            lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
            scale = (hi - lo) / _maxq(bits, False)
        else:
            scale = (hi - lo).clamp(min=1e-5) / _maxq(bits, False)
        rnd = round_ste if ste else torch.round
        out = quantize_dequant(x, scale, rnd(-lo / scale), bits, False, ste)
    return out.reshape(shape).to(dtype)
