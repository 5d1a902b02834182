"""Triton kernels for the dynamic activation quantizers (`--kernels triton|auto|reference`).

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

The online Hadamard stays `hadamard.hadamard_transform` (its factor matmuls fix the summation order);
only the quantizer that follows it runs here.
"""

import functools
import os

import torch

from .config import KERNELS
from .errors import OspEvalError

try:
    import triton
    import triton.language as tl
except Exception:  # CPU-only installs
    triton = tl = None


def triton_available() -> bool:
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise OspEvalError(f"--kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
    if kernels == "triton" and triton is None:
        raise OspEvalError("--kernels triton: triton does not import here; use --kernels reference (or auto)")


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    """Whether `kernels` sends this tensor to the Triton kernel (else the reference runs)."""
    if kernels == "reference" or triton is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if kernels == "triton":
        if not (x.is_cuda or _interpret()):
            raise OspEvalError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1): use --kernels auto")
        return True
    return x.is_cuda and _auto_ok(x.device)  # auto


def resolve_kernels(kernels: str, device) -> str:
    """What `kernels` runs on `device`: "triton" or "reference" (recorded with results)."""
    probe = torch.empty(0, device=device)
    return "triton" if kernels != "reference" and use_triton(kernels, probe) else "reference"


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
    def _fake_quant_rows(x_ptr, y_ptr, M, G, clip, maxq, inv_maxq,
                         SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr, CLIP: tl.constexpr,
                         RECIP: tl.constexpr, BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        """x viewed as [M, G]: each row is one token (or one group of a token) with its own scale/zero."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < M) & (cols[None, :] < G)
        offs = rows[:, None].to(tl.int64) * G + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        if ZERO_IN_RANGE:
            lo = tl.minimum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
        if CLIP:
            lo = lo * clip
            hi = hi * clip
        if SYM:
            amax = tl.maximum(tl.abs(lo), hi)
            scale = _over(amax, maxq, inv_maxq, RECIP)
            scale = tl.where(amax == 0, 1.0, scale)[:, None]
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, scale)), -(maxq + 1.0)), maxq)
            y = q * scale
        else:
            if ZERO_IN_RANGE:  # an all-zero row gets the range [-1, 1]
                both_zero = (lo == 0) & (hi == 0)
                lo = tl.where(both_zero, -1.0, lo)
                hi = tl.where(both_zero, 1.0, hi)
                scale = _over(hi - lo, maxq, inv_maxq, RECIP)
            else:
                scale = _over(tl.maximum(hi - lo, 1e-5), maxq, inv_maxq, RECIP)
            zero = _rint(tl.math.div_rn(-lo, scale))[:, None]
            scale = scale[:, None]
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, scale)) + zero, 0.0), maxq)
            y = (q - zero) * scale
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


def _launch_shape(g: int) -> tuple[int, int, int]:
    block_g = triton.next_power_of_2(g)
    block_m = max(1, min(64, 4096 // block_g))
    warps = 4 if block_m * block_g <= 4096 else (8 if block_g <= 8192 else 16)
    return block_m, block_g, warps


def fake_quant_act_triton(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0,
                          groupsize: int = -1, zero_in_range: bool | None = None) -> torch.Tensor:
    """quant.fake_quant_act (same arguments, same result bits) as one Triton kernel; no autograd."""
    if bits >= 16:
        return x
    if zero_in_range is None:
        zero_in_range = groupsize <= 0
    n = x.shape[-1]
    g = groupsize if groupsize > 0 else n
    if n % g:
        raise ValueError(f"activation groupsize {groupsize} does not divide dimension {n}")
    xc = x.contiguous()
    y = torch.empty_like(xc)
    m = xc.numel() // g
    if m == 0:
        return y
    maxq = float(2 ** (bits - 1) - 1 if sym else 2**bits - 1)
    block_m, block_g, warps = _launch_shape(g)
    _fake_quant_rows[(triton.cdiv(m, block_m),)](
        xc, y, m, g, float(clip_ratio), maxq, 1.0 / maxq,
        SYM=bool(sym), ZERO_IN_RANGE=bool(zero_in_range), CLIP=clip_ratio != 1.0, RECIP=xc.is_cuda, BF16=xc.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_G=block_g, num_warps=warps, enable_fp_fusion=False,
    )
    return y


class _FakeQuantSTE(torch.autograd.Function):
    """Kernel forward, straight-through backward (d out / d x = 1: the scale gets no gradient)."""

    @staticmethod
    def forward(ctx, x, bits, sym, clip_ratio, groupsize, zero_in_range):
        return fake_quant_act_triton(x, bits, sym, clip_ratio, groupsize, zero_in_range)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def fake_quant_act_ste(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0,
                       groupsize: int = -1, zero_in_range: bool | None = None) -> torch.Tensor:
    """Differentiable kernel quantizer with a pure straight-through gradient. Not what `ste=True` of the
    reference computes (its rounding is straight-through, but the gradient also flows through the scale and
    zero point, i.e. the token's min/max), so the runtime keeps the reference wherever a gradient is needed."""
    return _FakeQuantSTE.apply(x, bits, sym, clip_ratio, groupsize, zero_in_range)


def fake_quant_act(x: torch.Tensor, bits: int, sym: bool = False, clip_ratio: float = 1.0, groupsize: int = -1,
                   zero_in_range: bool | None = None, ste: bool = False, kernels: str = "reference"):
    """quant.fake_quant_act through the kernel `kernels` picks for x; identical values either way. A pass that
    needs gradients (rotation training) keeps the reference, whose gradient the kernel does not reproduce."""
    from .quant import fake_quant_act as reference

    if bits < 16 and use_triton(kernels, x) and not (torch.is_grad_enabled() and x.requires_grad):
        return fake_quant_act_triton(x, bits, sym, clip_ratio, groupsize, zero_in_range)
    return reference(x, bits, sym, clip_ratio, groupsize, zero_in_range, ste)


# --------------------------------------------------------------------------- auto: check once per device

_AUTO_CASES = (  # (sym, clip, groupsize, zero_in_range): the runtime's act, per-head o_proj, K and V quantizers
    (False, 1.0, -1, None), (True, 0.9, -1, None), (False, 1.0, 64, None), (False, 0.95, 64, True),
    (True, 0.95, 64, None),
)


@functools.lru_cache(maxsize=None)
def _auto_ok(device: torch.device) -> bool:
    """`auto` uses the kernel on a device only after it matched the reference bit for bit there (a few
    random tensors with outliers, all-zero rows and ties); otherwise it warns once and keeps the reference."""
    import warnings

    from .quant import fake_quant_act as reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 2, 256)
    x[3] = 0
    x[5, :8] = 400.0
    x[7] = torch.arange(256) / 2 - 64  # ties
    try:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            xd = x.to(device=device, dtype=dtype)
            for bits in (4, 8):
                for sym, clip, g, zir in _AUTO_CASES:
                    a = fake_quant_act_triton(xd, bits, sym, clip, g, zir)
                    b = reference(xd, bits, sym, clip, g, zir)
                    if not torch.equal(a, b):
                        warnings.warn(f"osp_eval.kernels: the Triton quantizer differs from the reference on "
                                      f"{device} ({dtype}, {bits} bits, sym={sym}, clip={clip}, group={g}); "
                                      "--kernels auto uses the reference")
                        return False
    except Exception as e:  # a broken Triton install: stay on the reference
        warnings.warn(f"osp_eval.kernels: the Triton quantizer failed on {device} ({type(e).__name__}: {e}); "
                      "--kernels auto uses the reference")
        return False
    return True


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
    Checked once per device on a random problem."""
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
            want = gptq_quantize_weight(W, H, 4, sym=sym, clip_search=True)
            ok = [v for v in ok if torch.equal(
                gptq_quantize_weight(W, H, 4, sym=sym, clip_search=True, kernels="triton", fma=v), want)]
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
    """Whether weight_qparams' clip search runs as the Triton kernel: as use_triton, and under auto only on a
    device where the kernel picked the reference's scales on a test weight (checked once per device)."""
    check_kernels(kernels)
    return use_triton(kernels, w) and (kernels == "triton" or _clip_auto_ok(w.device))


@functools.lru_cache(maxsize=None)
def _clip_auto_ok(device: torch.device) -> bool:
    import warnings

    from .quant import weight_qparams

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 384, generator=gen) * torch.logspace(-2, 1, 384)
    w[3] = 0
    w[5, :4] = 60.0
    w = w.to(device)
    try:
        for bits in (3, 4, 8):
            for sym in (True, False):
                got = weight_clip_search_triton(w, bits, sym)
                want = weight_qparams(w, bits, sym, clip_search=True)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    warnings.warn(f"osp_eval.kernels: the Triton clip search picked other scales than the "
                                  f"reference on {device} ({bits} bits, sym={sym}); --kernels auto uses the reference")
                    return False
    except Exception as e:
        warnings.warn(f"osp_eval.kernels: the Triton clip search failed on {device} ({type(e).__name__}: {e}); "
                      "--kernels auto uses the reference")
        return False
    return True
