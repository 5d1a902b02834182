"""The fused R3 kernel (osp_eval.kernels.qk_hadamard: Q/K Hadamard after RoPE, K fake quant per token and head).

Two references: an independent float32 loop that sums k = 0 .. n-1 in order (what the kernel promises, bit for
bit), and hadamard_transform(x, fp32=True) + quant.fake_quant_act (what the runtime computed so far). The second
sums in the order of the device's BLAS: bit for bit where that order is sequential (MKL's CPU sgemm here, checked
by `_blas_in_order`), else within 1 ulp of the output dtype on a tiny fraction of elements.
On CPU the kernel runs under Triton's interpreter; on a CUDA machine the same tests also run it compiled.
"""

import importlib
import math
import os

import numpy as np
import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import osp_eval.kernels as K  # noqa: E402
from sm90 import sm90_ptx  # noqa: E402

K = importlib.reload(K)  # decorate the kernels under the interpreter even if imported earlier
from osp_eval.hadamard import hadamard_transform  # noqa: E402
from osp_eval.quant import fake_quant_act  # noqa: E402
from osp_eval.runtime import ActSpec, KSpec  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
K_CASES = ((4, False, 1.0), (4, True, 0.9), (8, False, 0.95), (3, True, 1.0))  # (bits, sym, clip) of K


def _sylvester(n):  # written out here, independent of osp_eval.hadamard
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _sequential(x: torch.Tensor) -> torch.Tensor:
    """y_j = (sum_k x_k H[j, k], in order k = 0 .. n-1, float32) * fp32(1/sqrt(n)), cast to x's dtype."""
    n = x.shape[-1]
    xf = x.detach().float().cpu().numpy().reshape(-1, n)
    h = _sylvester(n)
    acc = np.zeros(xf.shape, dtype=np.float32)
    for k in range(n):
        acc = acc + xf[:, k : k + 1] * h[None, :, k]  # numpy float32: one rounding per op, no fma
    y = acc * np.float32(1 / math.sqrt(n))
    return torch.from_numpy(y).reshape(x.shape).to(device=x.device, dtype=x.dtype)


def _inputs(shape, seed=0):
    """[batch, heads, tokens, n] made non-contiguous (from [batch, tokens, heads, n] as attention does), over 3
    decades, with outliers, an all-zero row and a constant row."""
    g = torch.Generator().manual_seed(seed)
    b, h, t, n = shape
    x = torch.randn(b, t, h, n, generator=g) * torch.logspace(-2, 1, n)[torch.randperm(n, generator=g)]
    x[0, 0, -1, 3] = 500.0
    x[-1, :, -1, n // 2] = -80.0
    flat = x.view(-1, n)
    flat[1] = 0
    flat[2] = 0.75
    return x.transpose(1, 2)


def _bits_equal(a, b):
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def _blas_in_order(device, n) -> bool:
    """Whether hadamard_transform's GEMM on `device` sums k in order (random fp32 rows with mixed magnitudes)."""
    x = _inputs((2, 2, 16, n), seed=7).float().to(device)
    return torch.equal(hadamard_transform(x, fp32=True), _sequential(x))


def _within_one_ulp(a, b):
    """|a - b| <= 1 ulp of the dtype, on at most 1 % of the elements."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[a.dtype]
    af, bf = a.float(), b.float()
    d = (af - bf).abs()
    return bool((d <= bf.abs() * 2.0**-mant + 1e-30).all()) and (d > 0).float().mean().item() <= 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", (16, 64, 128))
def test_rotation_is_the_sequential_sum(device, n):
    for dtype in DTYPES:
        x = _inputs((2, 3, 5, n)).to(device=device, dtype=dtype)
        out = K.hadamard_rows_triton(x)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert _bits_equal(out, _sequential(x)), (dtype, (out.float() - _sequential(x).float()).abs().max())
        ref = hadamard_transform(x, fp32=True)
        if _blas_in_order(device, n):
            assert torch.equal(out, ref), dtype
        else:  # another BLAS order: the fp32 sums round apart, then the cast mostly hides it
            assert _within_one_ulp(out, ref), dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", (32, 128))
def test_fused_k_quant(device, n):
    """K: the kernel's rotation + quantizer equals fake_quant_act (K's per-head ActSpec) of the sequential sum,
    bit for bit, and the runtime's reference path where the BLAS sums in order."""
    in_order = _blas_in_order(device, n)
    for dtype in DTYPES:
        x = _inputs((1, 2, 6, n), seed=1).to(device=device, dtype=dtype)
        seq, ref = _sequential(x), hadamard_transform(x, fp32=True)
        for bits, sym, clip in K_CASES:
            act = ActSpec(bits, sym, clip, n, True)
            out = K.hadamard_rows_triton(x, act)
            assert _bits_equal(out, fake_quant_act(seq, bits, sym, clip, n, True)), (dtype, bits, sym, clip)
            if in_order:
                assert torch.equal(out, act(ref)), (dtype, bits, sym, clip)


def test_kspec_dispatch_and_fallbacks(monkeypatch):
    """KSpec with kernels="triton" goes through the kernel (same values as the reference KSpec) unless the shape,
    the groups or gradients need the reference; kernels="auto" on the CPU is the reference."""
    calls = []
    real = K.hadamard_rows_triton
    monkeypatch.setattr(K, "hadamard_rows_triton", lambda *a: calls.append(a[0].shape) or real(*a))

    def both(n, groupsize=None, **kw):
        q = _inputs((1, 4, 3, n), seed=2).to(torch.bfloat16)
        k = _inputs((1, 2, 3, n), seed=3).to(torch.bfloat16)
        g = n if groupsize is None else groupsize
        ref = KSpec(ActSpec(4, False, 1.0, g, True))(q, k)
        tri = KSpec(ActSpec(4, False, 1.0, g, True, kernels=kw.get("kernels", "triton")))(q, k)
        return ref, tri

    if _blas_in_order("cpu", 64):
        (rq, rk), (tq, tk) = both(64)
        assert torch.equal(rq, tq) and torch.equal(rk, tk) and len(calls) == 2
    for n, g, kernels in ((96, None, "triton"), (256, None, "triton"), (64, 32, "triton"), (64, None, "auto")):
        calls.clear()
        (rq, rk), (tq, tk) = both(n, g, kernels=kernels)
        assert torch.equal(rq, tq) and torch.equal(rk, tk) and not calls, (n, g, kernels)
    # Gradients (rotation training): the reference's autograd graph, not the kernel.
    q = _inputs((1, 2, 3, 64), seed=4).requires_grad_(True)
    k = _inputs((1, 2, 3, 64), seed=5).requires_grad_(True)
    calls.clear()
    tq, tk = KSpec(ActSpec(4, False, 1.0, 64, True, ste=True, kernels="triton"))(q, k)
    assert tq.grad_fn is not None and tk.grad_fn is not None and not calls


def test_auto_check_passes_where_blas_sums_in_order():
    """The once-per-device check of `auto`, run on the CPU (interpreter): it passes where the BLAS is in order."""
    if not (_blas_in_order("cpu", 64) and _blas_in_order("cpu", 128)):
        pytest.skip("this CPU's BLAS sums in another order")
    assert K._hadamard_auto_ok(torch.device("cpu"))


def test_quantized_model_logits():
    """A tiny Llama (head_dim 64) at W4A4KV4: kernels="triton" (fused R3 kernel) and "reference" give the same
    logits, bit for bit where the CPU BLAS sums in order (else within a small tolerance)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osp_eval import preset, quantize_
    from osp_eval.apply import set_kernels

    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn", kernels="reference"),
              progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        set_kernels(model, "triton")
        calls = []
        real = K.hadamard_rows_triton
        K.hadamard_rows_triton = lambda *a: calls.append(1) or real(*a)
        try:
            tri = model(ids).logits
        finally:
            K.hadamard_rows_triton = real
    assert len(calls) == 2 * cfg.num_hidden_layers  # Q and K of every layer went through the kernel
    if _blas_in_order("cpu", 64):
        assert torch.equal(ref, tri)
    else:
        torch.testing.assert_close(tri, ref, atol=0.05, rtol=0.05)




def test_compiles_for_hopper_without_fma():
    """The PTX for sm_90: no fused multiply-add (it would change the sums' rounding and the quantizer's
    `hi*c - lo*c`), IEEE division in the fused quantizer."""
    sig = {"x_ptr": "*bf16", "h_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "scale": "fp32", "clip": "fp32",
           "maxq": "fp32", "inv_maxq": "fp32",
           **{k: "constexpr" for k in ("QUANT", "SYM", "ZERO_IN_RANGE", "CLIP", "RECIP", "BF16", "N", "BLOCK_M")}}
    variants = [{"QUANT": quant, "SYM": False, "ZERO_IN_RANGE": True, "CLIP": True, "RECIP": True, "BF16": True,
                 "N": 128, "BLOCK_M": 32} for quant in (False, True)]
    ptx = sm90_ptx("_hadamard_rows", sig, variants)
    assert [("div.rn.f32" in p, "fma" in p) for p in ptx] == [(False, False), (True, False)]