"""Triton kernels for the dynamic activation quantizers (`--kernels auto|fast|triton|reference`).

auto (default) takes only what reproduces the reference bit for bit on the device (checked once per device);
fast adds GPU arithmetic equal to the reference only in exact arithmetic (`inexact`: GPTQ's TF32 Hessians,
one-Cholesky H⁻¹ and the clip-search kernel, SpinQuant's split-TF32 rotations and gradient kernel); triton forces
everything, unchecked. reference and auto give the same numbers; fast and triton are part of the cache identity.

`fake_quant_act` here computes exactly what `quant.fake_quant_act` computes, bit for bit, in one pass over
the input (fp32 in registers only) instead of ~12 PyTorch kernels with fp32 temporaries. The reference's
op order is replicated:
- scale = range / maxq: PyTorch on CUDA divides by a Python scalar as a multiplication by its fp32
  reciprocal (ATen's div_true_kernel_cuda), on the CPU it divides; the kernel does what the reference
  does on the input's device (the interpreter runs on CPU tensors);
- x / scale is an IEEE division (div_rn, not Triton's default approximate fp32 division);
- torch.round is round-half-to-even: (|y| + 2^23) - 2^23 in fp32 (libdevice is not in Triton's interpreter);
- fp32 -> bf16 rounds half to even on the bits (as .to(torch.bfloat16));
- no fp contraction (enable_fp_fusion=False): `hi*c - lo*c` must not become an fma.

Rotation training (`ste=True` with a gradient) runs `fake_quant_act_ste`: the same forward, and a backward
kernel that recomputes each row's range from x and returns the reference's autograd gradient (straight-through
rounding plus the terms through the scale and zero point into the row's min and max) up to fp32 summation order.

The online Hadamard of the Linears stays `hadamard.hadamard_transform` (its factor matmuls fix the summation
order); only the quantizer that follows it runs here. The Q/K Hadamard after RoPE (R3, head_dim 16..128: one
dense ±1 factor) runs here with K's quantizer fused (`qk_hadamard`): its fp32 sums go in order k = 0 .. n-1,
which is what `auto` checks the device's GEMM does before using it.
"""

import contextlib
import functools
import itertools
import math
import os

import torch

from .config import INEXACT_KERNELS, KERNELS
from .errors import OspEvalError
from .memo import memo  # once-per-device checks and constants, read by Dynamo without tracing into them

try:
    import triton
    import triton.language as tl
except Exception:  # CPU-only installs
    triton = tl = None


@contextlib.contextmanager
def tf32_matmuls(on: bool):
    """CUDA fp32 matmuls on TF32 tensor cores inside the block (when `on`), the global setting restored after. The
    GPU fast path uses it where TF32 loses nothing: products of bf16 values, which TF32 holds exactly."""
    if not on:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def triton_available() -> bool:
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def inexact(kernels: str) -> bool:
    """Whether `kernels` also takes the GPU paths that equal the reference only in exact arithmetic (GPTQ's TF32
    Hessians and one-Cholesky H⁻¹, the one-launch clip search, SpinQuant's split-TF32 rotations and backward
    kernel): "fast" (each where its check passed) and "triton" (forced). auto never does: same numbers."""
    return kernels in INEXACT_KERNELS


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise OspEvalError(f"--kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
    if kernels == "triton" and triton is None:
        raise OspEvalError("--kernels triton: triton does not import here; use --kernels reference (or auto)")


def use_triton(kernels: str, x: torch.Tensor, backward: bool = False) -> bool:
    """Whether `kernels` sends this tensor to the Triton kernel (else the reference runs); `backward`: also
    its gradient (rotation training)."""
    if kernels == "reference" or triton is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if kernels == "triton":
        if not (x.is_cuda or _interpret()):
            raise OspEvalError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1): use --kernels auto")
        return True
    # auto and fast: after the once-per-device checks; the gradient kernel (fp32 sums in another order) only for fast
    return x.is_cuda and _auto_ok(x.device) and (not backward or (kernels == "fast" and _auto_grad_ok(x.device)))


def resolve_kernels(kernels: str, device) -> str:
    """What `kernels` runs on `device`: "triton", "fast" (triton + the inexact GPU paths) or "reference"
    (recorded with results)."""
    probe = torch.empty(0, device=device)
    if kernels == "reference" or not use_triton(kernels, probe):
        return "reference"
    return "fast" if inexact(kernels) else "triton"


# --------------------------------------------------------------------------- the kernel

if tl is not None:

    @triton.jit
    def _rint(y):
        # Round half to even: for |y| < 2^23, |y| + 2^23 lies where the fp32 spacing is 1.
        a = tl.abs(y)
        r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
        return tl.where(y < 0, -r, r)

    @triton.jit
    def _over(v, maxq, inv_maxq, RECIP: tl.constexpr):
        if RECIP:
            return v * inv_maxq
        return tl.math.div_rn(v, maxq)

    @triton.jit
    def _range(lo, hi, clip, ZERO_IN_RANGE: tl.constexpr, CLIP: tl.constexpr):
        """The quantized range from the row's min and max: 0 kept inside it (per token), then the clip ratio."""
        if ZERO_IN_RANGE:
            lo = tl.minimum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
        if CLIP:
            lo = lo * clip
            hi = hi * clip
        return lo, hi

    @triton.jit
    def _grid(lo, hi, clip, maxq, inv_maxq, SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr, CLIP: tl.constexpr,
              RECIP: tl.constexpr):
        """Per-row scale and zero point (0 for sym) from the row's min and max, as the reference computes them."""
        lo, hi = _range(lo, hi, clip, ZERO_IN_RANGE, CLIP)
        if SYM:
            amax = tl.maximum(tl.abs(lo), hi)
            scale = _over(amax, maxq, inv_maxq, RECIP)
            scale = tl.where(amax == 0, 1.0, scale)
            zero = tl.zeros_like(scale)
        else:
            if ZERO_IN_RANGE:  # an all-zero row gets the range [-1, 1]
                both_zero = (lo == 0) & (hi == 0)
                lo = tl.where(both_zero, -1.0, lo)
                hi = tl.where(both_zero, 1.0, hi)
                scale = _over(hi - lo, maxq, inv_maxq, RECIP)
            else:
                scale = _over(tl.maximum(hi - lo, 1e-5), maxq, inv_maxq, RECIP)
            zero = _rint(tl.math.div_rn(-lo, scale))
        return scale, zero

    @triton.jit
    def _codes(x, scale, zero, maxq, SYM: tl.constexpr):
        """x / scale, its clamped integer code (zero point included) and whether the clamp let it through."""
        t = tl.math.div_rn(x, scale)
        if SYM:
            v = _rint(t)
            inside = (v >= -(maxq + 1.0)) & (v <= maxq)
            q = tl.minimum(tl.maximum(v, -(maxq + 1.0)), maxq)
        else:
            v = _rint(t) + zero
            inside = (v >= 0.0) & (v <= maxq)
            q = tl.minimum(tl.maximum(v, 0.0), maxq)
        return t, q, inside

    @triton.jit
    def _fake_quant_tile(x, mask, clip, maxq, inv_maxq, SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr,
                         CLIP: tl.constexpr, RECIP: tl.constexpr):
        """quant.fake_quant_act's math on an fp32 tile [rows, G], one scale/zero per row (fp32 result)."""
        lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        scale, zero = _grid(lo, hi, clip, maxq, inv_maxq, SYM, ZERO_IN_RANGE, CLIP, RECIP)
        scale = scale[:, None]
        _, q, _ = _codes(x, scale, zero[:, None], maxq, SYM)
        if SYM:
            y = q * scale
        else:
            y = (q - zero[:, None]) * scale
        return y

    @triton.jit
    def _fake_quant_rows(x_ptr, y_ptr, M, G, clip, maxq, inv_maxq,
                         SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr, CLIP: tl.constexpr,
                         RECIP: tl.constexpr, BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        """x viewed as [M, G]: each row is one token (or one group of a token) with its own scale/zero."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < M) & (cols[None, :] < G)
        offs = rows[:, None].to(tl.int64) * G + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _fake_quant_tile(x, mask, clip, maxq, inv_maxq, SYM, ZERO_IN_RANGE, CLIP, RECIP)
        if BF16:
            y = _to_bf16(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _to_bf16(y):
        # fp32 -> bf16 round-half-to-even on the bits (finite values): what .to(torch.bfloat16) does. Spelled
        # out because Triton's interpreter truncates in its own conversion.
        b = y.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)


    @triton.jit
    def _range_grad(lo, hi, S, C, scale, clip, maxq, inv_maxq, SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr,
                    CLIP: tl.constexpr, RECIP: tl.constexpr):
        """d loss / d (row min, row max) from S and C (see fake_quant_act_ste), along _grid's steps backwards."""
        lo0, hi0 = lo, hi
        lo, hi = _range(lo, hi, clip, ZERO_IN_RANGE, CLIP)
        if SYM:
            a = tl.abs(lo)
            d = tl.where(tl.maximum(a, hi) == 0, 0.0, _over(S, maxq, inv_maxq, RECIP))  # there scale = 1
            da = tl.where(a > hi, d, tl.where(a == hi, 0.5 * d, 0.0))  # torch.maximum halves a tie
            d_hi = tl.where(hi > a, d, tl.where(a == hi, 0.5 * d, 0.0))
            d_lo = tl.where(lo < 0, -da, da)  # d|lo|/dlo (at lo = 0, da = 0)
        else:
            if ZERO_IN_RANGE:
                keep = (lo != 0) | (hi != 0)  # an all-zero row's [-1, 1] is a constant
                lo = tl.where(keep, lo, -1.0)
            else:
                keep = hi - lo >= 1e-5  # clamp(min=1e-5) passes the gradient at and above its bound
            u = tl.math.div_rn(-lo, scale)
            d_hi = tl.where(keep, _over(S + u * C, maxq, inv_maxq, RECIP), 0.0)
            d_lo = C - d_hi  # an all-zero row has C = 0: its codes are z, inside
        if CLIP:
            d_lo = d_lo * clip
            d_hi = d_hi * clip
        if ZERO_IN_RANGE:  # clamp(max=0) / clamp(min=0) pass the gradient at 0 too
            d_lo = tl.where(lo0 <= 0, d_lo, 0.0)
            d_hi = tl.where(hi0 >= 0, d_hi, 0.0)
        return d_lo, d_hi

    @triton.jit
    def _fake_quant_rows_grad(x_ptr, g_ptr, dx_ptr, M, G, clip, maxq, inv_maxq,
                              SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr, CLIP: tl.constexpr,
                              RECIP: tl.constexpr, BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        """d loss / d x of quant.fake_quant_act(ste=True), x and the upstream gradient g viewed as [M, G]. Three
        passes over BLOCK_G-column chunks of each row: its min/max and how many elements attain them; the
        sums S and C; d x."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < M
        base = rows[:, None].to(tl.int64) * G
        lo = tl.full([BLOCK_M], float("inf"), tl.float32)
        hi = tl.full([BLOCK_M], float("-inf"), tl.float32)
        n_lo = tl.zeros([BLOCK_M], tl.float32)
        n_hi = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, G, BLOCK_G):
            cols = c0 + tl.arange(0, BLOCK_G)
            mask = live[:, None] & (cols[None, :] < G)
            x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            c_lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
            c_hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
            k_lo = tl.sum(tl.where(mask & (x == c_lo[:, None]), 1.0, 0.0), axis=1)
            k_hi = tl.sum(tl.where(mask & (x == c_hi[:, None]), 1.0, 0.0), axis=1)
            n_lo = tl.where(c_lo < lo, k_lo, tl.where(c_lo == lo, n_lo + k_lo, n_lo))
            n_hi = tl.where(c_hi > hi, k_hi, tl.where(c_hi == hi, n_hi + k_hi, n_hi))
            lo = tl.minimum(lo, c_lo)
            hi = tl.maximum(hi, c_hi)
        lo = tl.where(live, lo, 0.0)  # rows past M (never stored): keep their arithmetic finite
        hi = tl.where(live, hi, 0.0)
        scale, zero = _grid(lo, hi, clip, maxq, inv_maxq, SYM, ZERO_IN_RANGE, CLIP, RECIP)
        scale2, zero2 = scale[:, None], zero[:, None]
        S = tl.zeros([BLOCK_M], tl.float32)
        C = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, G, BLOCK_G):
            cols = c0 + tl.arange(0, BLOCK_G)
            mask = live[:, None] & (cols[None, :] < G)
            x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t, q, inside = _codes(x, scale2, zero2, maxq, SYM)
            S += tl.sum(g * (q - zero2 - tl.where(inside, t, 0.0)), axis=1)
            if not SYM:
                C += tl.sum(tl.where(inside, 0.0, g), axis=1)
        d_lo, d_hi = _range_grad(lo, hi, S, C, scale, clip, maxq, inv_maxq, SYM, ZERO_IN_RANGE, CLIP, RECIP)
        d_lo = (d_lo / tl.maximum(n_lo, 1.0))[:, None]  # amin/amax share the gradient evenly among ties
        d_hi = (d_hi / tl.maximum(n_hi, 1.0))[:, None]
        for c0 in range(0, G, BLOCK_G):
            cols = c0 + tl.arange(0, BLOCK_G)
            mask = live[:, None] & (cols[None, :] < G)
            offs = base + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _, _, inside = _codes(x, scale2, zero2, maxq, SYM)
            dx = tl.where(inside, tl.math.div_rn(g * scale2, scale2), 0.0)  # (g·s)/s, as autograd computes it
            dx = dx + tl.where(x == lo[:, None], d_lo, 0.0) + tl.where(x == hi[:, None], d_hi, 0.0)
            if BF16:
                dx = _to_bf16(dx)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_shape(g: int) -> tuple[int, int, int]:
    block_g = triton.next_power_of_2(g)
    block_m = max(1, min(64, 4096 // block_g))
    warps = 4 if block_m * block_g <= 4096 else (8 if block_g <= 8192 else 16)
    return block_m, block_g, warps


# The backward kernel walks each row in chunks of at most this many elements (three passes), so that rows of any
# length (down_proj inputs of 32K) keep a bounded register tile.
GRAD_TILE = 4096


def _grad_launch_shape(g: int) -> tuple[int, int, int]:
    block_g = min(triton.next_power_of_2(g), GRAD_TILE)
    block_m = max(1, min(64, GRAD_TILE // block_g))
    return block_m, block_g, 4 if block_m * block_g <= 2048 else 8


def _rows(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float, groupsize: int, zero_in_range: bool | None):
    """x as [m, g] rows with their own scale, and the kernels' scalar and constexpr arguments."""
    if zero_in_range is None:
        zero_in_range = groupsize <= 0
    n = x.shape[-1]
    g = groupsize if groupsize > 0 else n
    if n % g:
        raise ValueError(f"activation groupsize {groupsize} does not divide dimension {n}")
    maxq = float(2 ** (bits - 1) - 1 if sym else 2**bits - 1)
    flags = dict(SYM=bool(sym), ZERO_IN_RANGE=bool(zero_in_range), CLIP=clip_ratio != 1.0, RECIP=x.is_cuda,
                 BF16=x.dtype == torch.bfloat16)
    return x.numel() // g, g, (float(clip_ratio), maxq, 1.0 / maxq), flags


def fake_quant_act_triton(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0,
                          groupsize: int = -1, zero_in_range: bool | None = None) -> torch.Tensor:
    """quant.fake_quant_act (same arguments, same result bits) as one Triton kernel; no autograd."""
    if bits >= 16:
        return x
    m, g, scalars, flags = _rows(x, bits, sym, clip_ratio, groupsize, zero_in_range)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    if m == 0:
        return y
    block_m, block_g, warps = _launch_shape(g)
    _fake_quant_rows[(triton.cdiv(m, block_m),)](
        xc, y, m, g, *scalars, **flags, BLOCK_M=block_m, BLOCK_G=block_g, num_warps=warps, enable_fp_fusion=False,
    )
    return y


def fake_quant_act_triton_grad(x: torch.Tensor, grad: torch.Tensor, bits: int, sym: bool = False,
                               clip_ratio: float = 1.0, groupsize: int = -1,
                               zero_in_range: bool | None = None) -> torch.Tensor:
    """d loss / d x of quant.fake_quant_act(x, ..., ste=True) given d loss / d out = `grad` (x's shape and
    dtype): the reference's autograd gradient up to fp32 summation order, from x alone (the row ranges are
    recomputed), in one Triton kernel."""
    if bits >= 16:
        return grad
    m, g, scalars, flags = _rows(x, bits, sym, clip_ratio, groupsize, zero_in_range)
    xc, gc = x.contiguous(), grad.contiguous()
    dx = torch.empty_like(xc)
    if m == 0:
        return dx
    block_m, block_g, warps = _grad_launch_shape(g)
    _fake_quant_rows_grad[(triton.cdiv(m, block_m),)](
        xc, gc, dx, m, g, *scalars, **flags, BLOCK_M=block_m, BLOCK_G=block_g, num_warps=warps,
        enable_fp_fusion=False,
    )
    return dx


class _FakeQuantSTE(torch.autograd.Function):
    """Kernel forward and backward of quant.fake_quant_act(ste=True); saves only x."""

    @staticmethod
    def forward(ctx, x, bits, sym, clip_ratio, groupsize, zero_in_range):
        ctx.save_for_backward(x)
        ctx.args = (bits, sym, clip_ratio, groupsize, zero_in_range)
        return fake_quant_act_triton(x, bits, sym, clip_ratio, groupsize, zero_in_range)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return fake_quant_act_triton_grad(x, grad, *ctx.args), None, None, None, None, None


def fake_quant_act_ste(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0,
                       groupsize: int = -1, zero_in_range: bool | None = None) -> torch.Tensor:
    """quant.fake_quant_act(..., ste=True) as an autograd Function over the two kernels: the same values bit for
    bit, the reference's gradient up to fp32 rounding (summation order).

    That gradient, per row x_1..x_G in fp32 (one token, or one group of a token) and upstream g_j: with
    t_j = x_j / s, v_j = round(t_j) + z (z = 0 for sym), q_j = clamp(v_j) and p_j = [v_j within the clamp
    bounds, bounds included], rounding is straight-through but s and z depend on the row's min and max:

        dx_j = g_j p_j + [x_j = min] dlo / #min + [x_j = max] dhi / #max    (amin/amax split ties evenly)
        S = sum_j g_j (q_j - z - p_j t_j)     d loss / d s through y = (q - z) s and t = x / s
        C = sum_j g_j (1 - p_j)               asym: d loss / d z = -s C, the clamped codes' share

    and (dlo, dhi) follow lo, hi -> (zero_in_range: lo = min(lo, 0), hi = max(hi, 0)) -> times clip -> s, z back:
    - asym: s = (hi - lo) / maxq, z = round(u), u = -lo / s: dr = (S + u C) / maxq, dhi = dr, dlo = C - dr.
      zero_in_range: an all-zero row's range is the constant [-1, 1] (no gradient); without it (groupwise),
      hi - lo is clamped at 1e-5: below that dr = 0 and only dlo = C remains;
    - sym: s = max(|lo|, hi) / maxq: da = S / maxq (0 where the maximum is 0: s = 1 there), all to the larger
      of |lo| and hi, half to each on a tie; dlo = da sign(lo);
    - then times clip, and with zero_in_range only where lo <= 0 (hi >= 0): clamp passes its bound.
    """
    if bits >= 16:
        return x
    return _FakeQuantSTE.apply(x, bits, sym, clip_ratio, groupsize, zero_in_range)


def fake_quant_act(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0, groupsize: int = -1,
                   zero_in_range: bool | None = None, ste: bool = False, kernels: str = "reference"):
    """quant.fake_quant_act through the kernel `kernels` picks for x; identical values either way. Where a
    gradient is needed, `ste=True` (rotation training) runs the kernels' autograd Function (the reference's
    gradient up to fp32 rounding); without `ste` the reference's own graph stays."""
    from .quant import fake_quant_act as reference

    if bits < 16:
        if not (torch.is_grad_enabled() and x.requires_grad):
            if use_triton(kernels, x):
                run = _fake_quant_act_op if torch.compiler.is_compiling() else fake_quant_act_triton
                return run(x, bits, sym, clip_ratio, groupsize, zero_in_range)
        elif ste and use_triton(kernels, x, backward=True):
            return _FakeQuantSTE.apply(x, bits, sym, clip_ratio, groupsize, zero_in_range)
    return reference(x, bits, sym, clip_ratio, groupsize, zero_in_range, ste)


# --------------------------------------------------------------------------- auto: check once per device

_AUTO_CASES = (  # (sym, clip, groupsize, zero_in_range): the runtime's act, per-head o_proj, K and V quantizers
    (False, 1.0, -1, None), (True, 0.9, -1, None), (False, 1.0, 64, None), (False, 0.95, 64, True),
    (True, 0.95, 64, None),
)


def _probe() -> torch.Tensor:
    """auto's test tensor: rows over 5 decades, an all-zero row, tied maxima, rounding ties, |min| = max."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 2, 256)
    x[3] = 0
    x[5, :8] = 400.0
    x[7] = torch.arange(256) / 2 - 64  # ties
    x[9] = x[9].sign() * 3
    return x


def _self_check(what: str, device: torch.device, cases, consequence: str = "uses the reference",
                mode: str = "auto") -> bool:
    """The once-per-device check behind each kernel of `--kernels mode` (auto, or fast for the inexact ones):
    `cases()` yields a description of every case where the kernel differs from the reference (the first one
    decides). A difference or an error (e.g. a broken Triton install) warns once and keeps the reference."""
    import warnings

    try:
        bad = next(iter(cases()), None)
    except Exception as e:
        warnings.warn(f"osp_eval.kernels: the Triton {what} failed on {device} ({type(e).__name__}: {e}); "
                      f"--kernels {mode} {consequence}")
        return False
    if bad is not None:
        warnings.warn(f"osp_eval.kernels: the Triton {what} differs from the reference on {device} ({bad}); "
                      f"--kernels {mode} {consequence}")
        return False
    return True


@memo
def _auto_ok(device: torch.device) -> bool:
    """`auto` uses the kernel on a device only after it matched the reference bit for bit there (a few
    random tensors with outliers, all-zero rows and ties); otherwise it warns once and keeps the reference."""
    from .quant import fake_quant_act as reference

    def cases():
        x = _probe()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            xd = x.to(device=device, dtype=dtype)
            for bits in (4, 8):
                for sym, clip, g, zir in _AUTO_CASES:
                    if not torch.equal(fake_quant_act_triton(xd, bits, sym, clip, g, zir),
                                       reference(xd, bits, sym, clip, g, zir)):
                        yield f"{dtype}, {bits} bits, sym={sym}, clip={clip}, group={g}"

    return _self_check("quantizer", device, cases)


def grad_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Gradient a within rtol·max|b| of b, plus one rounding of b's dtype per element (a bf16 gradient is
    rounded once, from fp32 sums that may differ in their last bit)."""
    eps = torch.finfo(b.dtype).eps
    a, b = a.float(), b.float()
    return bool(((a - b).abs() <= rtol * b.abs().max() + eps * b.abs()).all())


@memo
def _auto_grad_ok(device: torch.device) -> bool:
    """`fast` trains through the kernels' backward on a device only after it matched the reference's autograd
    gradient there (grad_close, bf16 and fp32, the cases of _AUTO_CASES); otherwise the reference trains."""
    from .quant import fake_quant_act as reference

    def cases():
        x = _probe()
        up = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        with torch.enable_grad():
            for dtype in (torch.bfloat16, torch.float32):
                xd, ud = x.to(device=device, dtype=dtype).requires_grad_(True), up.to(device=device, dtype=dtype)
                for bits in (4, 8):
                    for sym, clip, g, zir in _AUTO_CASES:
                        (a,) = torch.autograd.grad(fake_quant_act_ste(xd, bits, sym, clip, g, zir), xd, ud)
                        (b,) = torch.autograd.grad(reference(xd, bits, sym, clip, g, zir, ste=True), xd, ud)
                        if not grad_close(a, b):
                            yield f"{dtype}, {bits} bits, sym={sym}, clip={clip}, group={g}"

    return _self_check("quantizer's gradient", device, cases, "trains through the reference", mode="fast")


# --------------------------------------------------------------------------- R3: the Q/K Hadamard after RoPE

HADAMARD_SIZES = (16, 32, 64, 128)  # head_dim with one dense Sylvester factor in hadamard._factors

if tl is not None:

    @triton.jit
    def _hadamard_rows(x_ptr, h_ptr, y_ptr, M, scale, clip, maxq, inv_maxq, QUANT: tl.constexpr,
                       SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr, CLIP: tl.constexpr, RECIP: tl.constexpr,
                       BF16: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr):
        """x viewed as [M, N]: y_j = sum_k x_k H[j, k], the sum taken in order k = 0 .. N-1 in one fp32
        accumulator (x_k * ±1 is exact, so this order is the only rounding: that of a SIMT sgemm), then
        * fp32(scale), rounded to y's dtype. QUANT: then K's fake quant per row (token and head) on those values."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, N)
        rmask = rows < M
        base = rows.to(tl.int64) * N
        acc = tl.zeros((BLOCK_M, N), dtype=tl.float32)
        for k in range(N):
            xk = tl.load(x_ptr + base + k, mask=rmask, other=0.0).to(tl.float32)
            hk = tl.load(h_ptr + k * N + cols)  # h_ptr holds H^T: row k is H[j, k] for every output j
            acc = acc + xk[:, None] * hk[None, :]
        y = acc * scale
        mask = rmask[:, None] & (cols[None, :] < N)
        if QUANT:  # the reference quantizes the rotated key after its cast to the key's dtype
            if BF16:
                y = _to_bf16(y)
            y = _fake_quant_tile(y.to(y_ptr.dtype.element_ty).to(tl.float32), mask, clip, maxq, inv_maxq,
                                 SYM, ZERO_IN_RANGE, CLIP, RECIP)
        if BF16:
            y = _to_bf16(y)
        tl.store(y_ptr + base[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _k_quant_args(act, n: int):
    """(quant, sym, zero_in_range, clip, maxq) of K's ActSpec for rows of n, or None if its groups are not
    whole rows (then the fused kernel does not apply)."""
    if act is None or act.bits >= 16:
        return False, False, False, 1.0, 1.0
    if act.groupsize > 0 and act.groupsize != n:
        return None
    zir = act.zero_in_range if act.zero_in_range is not None else act.groupsize <= 0
    maxq = float(2 ** (act.bits - 1) - 1 if act.sym else 2**act.bits - 1)
    return True, bool(act.sym), bool(zir), float(act.clip_ratio), maxq


@memo
def _hadamard_t(n: int, device: torch.device) -> torch.Tensor:
    """H^T of the reference's dense ±1 fp32 factor (hadamard._factors), rows contiguous for the kernel's loads."""
    from .hadamard import _factors

    return _factors(n, torch.float32, device)[0].T.contiguous()


def hadamard_rows_triton(x: torch.Tensor, act=None) -> torch.Tensor:
    """hadamard.hadamard_transform(x, fp32=True) for a last dim n in HADAMARD_SIZES, then, if `act` (an ActSpec
    whose groups are whole rows) quantizes, its fake quant: one read and one write of x. The sum over k runs in
    order 0 .. n-1; equal to the reference bit for bit wherever its fp32 GEMM sums in that order."""
    n = x.shape[-1]
    if n not in HADAMARD_SIZES:
        raise ValueError(f"hadamard_rows_triton: last dim {n} not in {HADAMARD_SIZES}")
    args = _k_quant_args(act, n)
    return (_hadamard_rows_op if torch.compiler.is_compiling() else _hadamard_rows_launch)(x, *args)


def _hadamard_rows_launch(x: torch.Tensor, quant: bool, sym: bool, zir: bool, clip: float,
                          maxq: float) -> torch.Tensor:
    n = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    m = xc.numel() // n
    if m == 0:
        return y
    h = _hadamard_t(n, xc.device)
    block_m, _, warps = _launch_shape(n)
    _hadamard_rows[(triton.cdiv(m, block_m),)](
        xc, h, y, m, 1.0 / math.sqrt(n), clip, maxq, 1.0 / maxq,
        QUANT=quant, SYM=sym, ZERO_IN_RANGE=zir, CLIP=clip != 1.0, RECIP=xc.is_cuda, BF16=xc.dtype == torch.bfloat16,
        N=n, BLOCK_M=block_m, num_warps=warps, enable_fp_fusion=False,
    )
    return y


def _fused_qk(query: torch.Tensor, key: torch.Tensor, act, kernels: str) -> bool:
    n = key.shape[-1]
    if n != query.shape[-1] or n not in HADAMARD_SIZES or _k_quant_args(act, n) is None:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return False  # rotation training: the reference's autograd graph
    if not (use_triton(kernels, query) and use_triton(kernels, key)):
        return False
    return kernels == "triton" or _hadamard_auto_ok(key.device)


def qk_hadamard(query: torch.Tensor, key: torch.Tensor, act, kernels: str):
    """runtime.KSpec's rotation: (H q, quant(H k)), H = hadamard_transform(·, fp32=True), quant = act (K's ActSpec).
    The Triton kernel serves head_dim in HADAMARD_SIZES without gradients when `kernels` is "triton", or "auto"
    on a device where it matched the reference bit for bit (_hadamard_auto_ok). With "triton" it runs even where
    that check fails: there the fp32 sums may round differently from the reference GEMM's (its summation order),
    about 1 ulp of the output dtype on a few elements. Otherwise the reference runs. The check covers two shapes;
    a BLAS that picks another summation order for other shapes would go unnoticed."""
    if _fused_qk(query, key, act, kernels):
        return hadamard_rows_triton(query), hadamard_rows_triton(key, act)
    from .hadamard import hadamard_transform

    return hadamard_transform(query, fp32=True), act(hadamard_transform(key, fp32=True))


_HADAMARD_K_CASES = ((4, False, 1.0), (4, True, 0.95), (8, False, 0.9))  # (bits, sym, clip) of K, per head


@memo
def _hadamard_auto_ok(device: torch.device) -> bool:
    """`auto` uses the fused R3 kernel on a device only after it matched hadamard_transform(·, fp32=True) (and the
    reference K quantizer after it) bit for bit there; the GEMM's summation order is the device's BLAS's, so this
    is checked, not assumed. Otherwise warns once and keeps the reference."""
    from .hadamard import hadamard_transform
    from .quant import fake_quant_act as reference
    from .runtime import ActSpec

    def cases():
        gen = torch.Generator().manual_seed(0)
        # BLAS picks its GEMM kernel (and so its order) by shape: a decoding-sized and, on a GPU, a prefill-sized one.
        shapes = [(2, 8, 2)] + ([(1, 1024, 32)] if device.type == "cuda" else [])
        for n, (b, t, h) in itertools.product(HADAMARD_SIZES, shapes):
            x = torch.randn(b, t, h, n, generator=gen) * torch.logspace(-2, 1, n)
            x[0, 1, 1, 5] = 300.0  # outliers
            x[-1, :, 0, 7] = -150.0
            x[-1, 2, 1] = 0
            x = x.transpose(1, 2)  # [batch, heads, tokens, n], not contiguous: as attention's q/k
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                xd = x.to(device=device, dtype=dtype)
                want = hadamard_transform(xd, fp32=True)
                ok = torch.equal(hadamard_rows_triton(xd), want)
                for bits, sym, clip in _HADAMARD_K_CASES:
                    act = ActSpec(bits, sym, clip, n, True)
                    ok = ok and torch.equal(hadamard_rows_triton(xd, act), reference(want, bits, sym, clip, n, True))
                if not ok:
                    yield f"{dtype}, head_dim {n}: the fp32 GEMM sums in another order"

    return _self_check("Q/K Hadamard", device, cases)


# --------------------------------------------------------------------------- GPTQ: one 128-column block per launch

if tl is not None:

    @triton.jit
    def _gptq_block(w_ptr, e_ptr, v_ptr, s_ptr, z_ptr, n, nb, ldw, ldv, sv, maxq,
                    SYM: tl.constexpr, FMA: tl.constexpr, B: tl.constexpr, TILE: tl.constexpr):
        """The column loop of one GPTQ block for TILE weight rows, in registers. Layout as in
        gptq.gptq_quantize_weight: w [nb, n] is the block of the transposed weight (one weight column per row),
        v [nb, nb] the block of U/diag(U), e [nb, n] receives w - q per column. Per column i: q = grid(w_i),
        e_i = w_i - q, later columns w_j -= v_ij * e_i (the reference's addr_), w_i = q."""
        cols = tl.program_id(0) * TILE + tl.arange(0, TILE)
        rows = tl.arange(0, B)
        cm = cols < n
        m = (rows[:, None] < nb) & cm[None, :]
        offs = rows[:, None].to(tl.int64) * ldw + cols[None, :]
        w = tl.load(w_ptr + offs, mask=m, other=0.0)
        s = tl.load(s_ptr + cols, mask=cm, other=1.0)
        z = tl.load(z_ptr + cols, mask=cm, other=0.0)
        for i in range(nb):
            here = rows[:, None] == i
            wi = tl.sum(tl.where(here, w, 0.0), axis=0)  # column i (adds exact zeros)
            if SYM:
                q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(wi, s)), -(maxq + 1.0)), maxq) * s
            else:
                q = (tl.minimum(tl.maximum(_rint(tl.math.div_rn(wi, s)) + z, 0.0), maxq) - z) * s
            e = wi - q
            tl.store(e_ptr + i * ldw + cols, e, mask=cm)
            v = tl.load(v_ptr + i * ldv + rows * sv, mask=(rows > i) & (rows < nb), other=0.0)
            if FMA:
                upd = tl.fma(-v[:, None], e[None, :], w)
            else:
                upd = w - v[:, None] * e[None, :]
            w = tl.where(rows[:, None] > i, upd, w)
            w = tl.where(here, q[None, :], w)
        tl.store(w_ptr + offs, w, mask=m)


GPTQ_TILE = 32


def gptq_block_triton(W1: torch.Tensor, V1: torch.Tensor, E1: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                      bits: int, sym: bool, fma: bool = False) -> None:
    """In place: the per-column loop of gptq.gptq_quantize_weight over one block (W1 [nb, n] fp32, contiguous
    rows; V1 [nb, nb], any strides; per-row scale s and zero z [n]), one launch."""
    nb, n = W1.shape
    maxq = float(2 ** (bits - 1) - 1 if sym else 2**bits - 1)
    B = max(16, triton.next_power_of_2(nb))
    _gptq_block[(triton.cdiv(n, GPTQ_TILE),)](
        W1, E1, V1, s, z, n, nb, W1.stride(0), V1.stride(0), V1.stride(1), maxq,
        SYM=bool(sym), FMA=bool(fma), B=B, TILE=GPTQ_TILE, num_warps=4, enable_fp_fusion=False,
    )


@functools.lru_cache(maxsize=None)
def gptq_variant(device: torch.device) -> bool | None:
    """Which update the GPTQ kernel needs to equal the reference loop bit for bit on `device`: False (a product
    then a subtraction), True (one fma, as a contracted addr_ computes), or None (neither: keep the reference).
    Checked once per device on a random problem, with everything else of the GPU fast path (the clip-search
    kernel, the one-Cholesky inverse) switched off on both sides: only the column loop is compared."""
    import warnings

    from .gptq import gptq_quantize_weight

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(96, 256, generator=gen) * torch.logspace(-1, 1, 256)
    X = torch.randn(512, 256, generator=gen)
    H = (X.t() @ X).to(device)
    W = W.to(device)
    try:
        ok = [False, True]
        for sym in (True, False):
            want = gptq_quantize_weight(W, H, 4, sym=sym)
            ok = [v for v in ok if torch.equal(
                gptq_quantize_weight(W, H, 4, sym=sym, kernels="triton", fma=v, fast_linalg=False), want)]
        if ok:
            return ok[0]
        warnings.warn(f"osp_eval.kernels: the Triton GPTQ block differs from the reference on {device}; "
                      "--kernels auto keeps the reference GPTQ loop")
        return None
    except Exception as e:
        warnings.warn(f"osp_eval.kernels: the Triton GPTQ block failed on {device} ({type(e).__name__}: {e}); "
                      "--kernels auto keeps the reference GPTQ loop")
        return None


# --------------------------------------------------------------------------- the weight MSE clip search

if tl is not None:

    @triton.jit
    def _clip_errors(w_ptr, s_ptr, z_ptr, e_ptr, R, C, maxq, NP: tl.constexpr, SYM: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """err[r, k] = sum_j |grid_k(w[r, j]) - w[r, j]|^2.4 for BLOCK_R rows and BLOCK_P of the NP candidates
        (scale s and zero z [R, NP]), as a [BLOCK_R, BLOCK_P, BLOCK_C] tile per column chunk: one load of w
        serves BLOCK_P candidates. The grid point is quant.quantize_dequant's, bit for bit; the power and the
        sum are not torch's (see weight_clip_search_triton)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cand = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        rm = rows < R
        sm = rm[:, None] & (cand < NP)[None, :]
        soffs = rows[:, None].to(tl.int64) * NP + cand[None, :]
        s = tl.load(s_ptr + soffs, mask=sm, other=1.0)[:, :, None]
        z = tl.load(z_ptr + soffs, mask=sm, other=0.0)[:, :, None]
        acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = rm[:, None] & (cols < C)[None, :]
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0)[:, None, :]
            y = _rint(tl.math.div_rn(w, s))
            if SYM:
                q = tl.minimum(tl.maximum(y, -(maxq + 1.0)), maxq) * s
            else:
                q = (tl.minimum(tl.maximum(y + z, 0.0), maxq) - z) * s
            d = tl.abs(q - w)
            # |d|^2.4 as d^2 * 2^(0.4 log2 d) (0 for d = 0): the small exponent keeps its fp32 rounding small in
            # the result. Not torch's pow bits.
            e = d * d * tl.exp2(0.4 * tl.log2(tl.where(d > 0, d, 1.0)))
            acc += tl.sum(tl.where(m[:, None, :], e, 0.0), axis=2)
        tl.store(e_ptr + soffs, acc, mask=sm)


_CLIP_WARPS = 4


def _clip_launch_shape(cols: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_P, BLOCK_C): about 4096 elements a tile (rows x candidates x columns); short rows (groups)
    take several rows a program. The interpreter runs a tile as numpy arrays: fewer, larger tiles are faster."""
    block_c = min(triton.next_power_of_2(cols), 2048 if interpret else 256)
    block_p = 16
    block_r = max(1, (4096 if not interpret else 65536) // (block_p * block_c))
    return block_r, block_p, block_c


def clip_errors_triton(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool):
    """The clip search's error of every candidate: err [rows, k] for w [rows, cols] (fp32) under the candidates'
    scale and zero [rows, k] (quant.clip_candidates), one launch."""
    w, scale, zero = w.contiguous(), scale.contiguous(), zero.contiguous()
    rows, cols = w.shape
    k = scale.shape[1]
    err = torch.empty(rows, k, dtype=torch.float32, device=w.device)
    if rows == 0:
        return err
    maxq = float(2 ** (bits - 1) - 1 if sym else 2**bits - 1)
    br, bp, bc = _clip_launch_shape(cols, _interpret())
    _clip_errors[(triton.cdiv(rows, br), triton.cdiv(k, bp))](
        w, scale, zero, err, rows, cols, maxq, NP=k, SYM=bool(sym), BLOCK_R=br, BLOCK_P=bp, BLOCK_C=bc,
        num_warps=_CLIP_WARPS, enable_fp_fusion=False,
    )
    return err


def first_min(err: torch.Tensor) -> torch.Tensor:
    """Per row, the candidate the reference loop keeps: it takes k when err[k] < best (best starting at inf),
    i.e. the first smallest error; NaN never wins, and a row without a finite error keeps candidate 0 (p = 1,
    the unclipped range it starts from)."""
    return torch.where(torch.isnan(err), float("inf"), err).argmin(1)  # argmin: the first of equal minima


def weight_clip_search_triton(w: torch.Tensor, bits: int, sym: bool):
    """quant.weight_qparams(w, bits, sym, clip_search=True) with the 80 candidates' errors in one Triton launch
    (fp32 in registers) instead of ~14 PyTorch kernels over the whole weight per candidate.

    The candidates' scales and zeros are quant.clip_candidates' (the reference's ops on the same device) and
    every grid point equals quant.quantize_dequant's bit for bit. The error values are not torch's bits: the
    power is 2^(0.4 log2 d) d^2 and the sum runs in another order. A row's choice can therefore differ from the
    reference's only where two candidates' errors lie within float rounding of each other."""
    from .quant import clip_candidates, weight_range

    w = w.float()
    xmin, xmax = weight_range(w)
    scale, zero = clip_candidates(xmin, xmax, bits, sym)
    k = first_min(clip_errors_triton(w, scale, zero, bits, sym))[:, None]
    return scale.gather(1, k), zero.gather(1, k)


def use_clip_kernel(kernels: str, w: torch.Tensor) -> bool:
    """Whether weight_qparams' clip search runs as the Triton kernel: never under auto (its error sums round
    otherwise than the reference's); under fast as use_triton, and only on a device where the kernel picked the
    reference's scales on a test weight (checked once per device); under triton always."""
    check_kernels(kernels)
    return inexact(kernels) and use_triton(kernels, w) and (kernels == "triton" or _clip_auto_ok(w.device))


@memo
def _clip_auto_ok(device: torch.device) -> bool:
    """`fast` uses the clip-search kernel on a device only after it picked the reference's scales on a test weight
    there; otherwise it warns once and keeps the reference."""
    from .quant import weight_qparams

    def cases():
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 384, generator=gen) * torch.logspace(-2, 1, 384)
        w[3] = 0
        w[5, :4] = 60.0
        w = w.to(device)
        for bits in (3, 4, 8):
            for sym in (True, False):
                got = weight_clip_search_triton(w, bits, sym)
                want = weight_qparams(w, bits, sym, clip_search=True)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    yield f"other scales picked, {bits} bits, sym={sym}"

    return _self_check("clip search", device, cases, mode="fast")


# --------------------------------------------------------------------------- torch.compile

# Under torch.compile the forward kernels run as custom ops: Dynamo does not trace into the launch code, Inductor
# keeps each kernel as one opaque call (the same kernel, the same bits) and fuses what surrounds it.

@torch.library.custom_op("osp_eval::fake_quant_act", mutates_args=())
def _fake_quant_act_op(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float, groupsize: int,
                       zero_in_range: bool | None) -> torch.Tensor:
    return fake_quant_act_triton(x, bits, sym, clip_ratio, groupsize, zero_in_range)


@_fake_quant_act_op.register_fake
def _(x, bits, sym, clip_ratio, groupsize, zero_in_range):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("osp_eval::hadamard_rows", mutates_args=())
def _hadamard_rows_op(x: torch.Tensor, quant: bool, sym: bool, zir: bool, clip: float, maxq: float) -> torch.Tensor:
    return _hadamard_rows_launch(x, quant, sym, zir, clip, maxq)


@_hadamard_rows_op.register_fake
def _(x, quant, sym, zir, clip, maxq):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
