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

The online Hadamard of the Linears stays `hadamard.hadamard_transform` (its factor matmuls fix the summation
order); only the quantizer that follows it runs here. The Q/K Hadamard after RoPE (R3, head_dim 16..128: one
dense ±1 factor) runs here with K's quantizer fused (`qk_hadamard`): its fp32 sums go in order k = 0 .. n-1,
which is what `auto` checks the device's GEMM does before using it.
"""

import functools
import itertools
import math
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
    def _fake_quant_tile(x, mask, clip, maxq, inv_maxq, SYM: tl.constexpr, ZERO_IN_RANGE: tl.constexpr,
                         CLIP: tl.constexpr, RECIP: tl.constexpr):
        """quant.fake_quant_act's math on an fp32 tile [rows, G], one scale/zero per row (fp32 result)."""
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


@functools.lru_cache(maxsize=16)
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
    quant, sym, zir, clip, maxq = _k_quant_args(act, n)
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


@functools.lru_cache(maxsize=None)
def _hadamard_auto_ok(device: torch.device) -> bool:
    """`auto` uses the fused R3 kernel on a device only after it matched hadamard_transform(·, fp32=True) (and the
    reference K quantizer after it) bit for bit there; the GEMM's summation order is the device's BLAS's, so this
    is checked, not assumed. Otherwise warns once and keeps the reference."""
    import warnings

    from .hadamard import hadamard_transform
    from .quant import fake_quant_act as reference
    from .runtime import ActSpec

    gen = torch.Generator().manual_seed(0)
    # BLAS picks its GEMM kernel (and so its order) by shape: a decoding-sized and, on a GPU, a prefill-sized one.
    shapes = [(2, 8, 2)] + ([(1, 1024, 32)] if device.type == "cuda" else [])
    try:
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
                    warnings.warn(f"osp_eval.kernels: the Triton Q/K Hadamard differs from the reference on {device} "
                                  f"({dtype}, head_dim {n}: the fp32 GEMM sums in another order); --kernels auto "
                                  "uses the reference")
                    return False
    except Exception as e:
        warnings.warn(f"osp_eval.kernels: the Triton Q/K Hadamard failed on {device} ({type(e).__name__}: {e}); "
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
