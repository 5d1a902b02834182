"""The Triton quantizer's backward (osp_eval.kernels, rotation training) against the reference's autograd:
quant.fake_quant_act(..., ste=True) rounds straight-through, but its gradient also reaches each row's min and
max through the scale and zero point. Runs under Triton's interpreter on CPU (small tensors)."""

import importlib
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import osp_eval.kernels as K  # noqa: E402
from sm90 import sm90_ptx  # noqa: E402

K = importlib.reload(K)  # decorate the kernels under the interpreter even if imported earlier
from osp_eval.quant import fake_quant_act  # noqa: E402

RTOL = 1e-5  # of max|grad|: the fp32 sums of the row's range terms differ from PyTorch's in order only


def _inputs(shape, seed=0):
    """Rows over 5 decades, plus: an all-zero row, an outlier, an all-positive row (zero_in_range holds the
    min at 0), tied maxima and minima, |min| = max everywhere (torch.maximum halves), exact rounding ties, a
    row of range 4e-6 (groupwise asym: below the 1e-5 clamp), rows whose min (max) is exactly 0 in every group
    of 32 (zero_in_range's clamp passes the gradient there)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, n)[torch.randperm(n, generator=g)]
    f = x.view(-1, n)
    f[1] = 0
    f[2, n // 3] = 3e4
    f[3] = f[3].abs()
    f[4, :3] = f[4].max()
    f[4, -2:] = f[4].min()
    f[5, ::2], f[5, 1::2] = 2.0, -2.0
    ties = torch.tensor([7.0, 2.5, -3.5, 0.5, 1.5, -0.5, -8.0, 14.0, -1.0, 6.5])  # 4-bit sym scale 1 / asym 1.4
    f[6, : len(ties)] = ties
    f[6, len(ties):] = 0.5
    f[7] = 0.75
    f[7, ::3] += 4e-6
    f[8] = f[8].abs()
    f[8, ::32] = 0
    f[9] = -f[9].abs()
    f[9, 1::32] = 0
    return x


def _upstream(x, seed=1):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)


def _reference_grad(x, up, *args):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(fake_quant_act(x, *args, ste=True), x, up)[0]


def _kernel(x, up, *args):
    x = x.detach().requires_grad_(True)
    y = K.fake_quant_act_ste(x, *args)
    return y.detach(), torch.autograd.grad(y, x, up)[0]


def _close(a, b):
    """Within RTOL·max|b|, plus one rounding of a 16-bit gradient per element."""
    return K.grad_close(a, b, RTOL)


def _derived_grad(x, up, bits, sym, clip, groupsize, zir, range_terms=True):
    """The gradient of kernels.fake_quant_act_ste's docstring in float64, with the forward's fp32 decisions
    (codes, clamps, ties). range_terms=False: the straight-through term g·p alone."""
    zir = groupsize <= 0 if zir is None else zir
    gs = groupsize if groupsize > 0 else x.shape[-1]
    xf, g = x.float().reshape(-1, gs), up.double().reshape(-1, gs)
    maxq = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    lo0, hi0 = xf.amin(1, keepdim=True), xf.amax(1, keepdim=True)
    lo, hi = (lo0.clamp(max=0), hi0.clamp(min=0)) if zir else (lo0, hi0)
    lo, hi = lo * clip, hi * clip
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        scale = torch.where(amax == 0, 1.0, amax / maxq)
        t = xf / scale
        v = torch.round(t)
        inside = ((v >= -maxq - 1) & (v <= maxq)).double()
        q = v.clamp(-maxq - 1, maxq).double()
        S = (g * (q - inside * t.double())).sum(1, keepdim=True)
        d = torch.where(amax == 0, 0.0, S / maxq)
        a = lo.abs()
        d_lo = torch.where(a > hi, d, torch.where(a == hi, d / 2, 0.0)) * torch.sign(lo)
        d_hi = torch.where(hi > a, d, torch.where(a == hi, d / 2, 0.0))
    else:
        if zir:
            keep = (lo != 0) | (hi != 0)
            lo, hi = torch.where(keep, lo, -1.0), torch.where(keep, hi, 1.0)
            scale = (hi - lo) / maxq
        else:
            keep = hi - lo >= 1e-5
            scale = (hi - lo).clamp(min=1e-5) / maxq
        u = -lo / scale
        t = xf / scale
        v = torch.round(t) + torch.round(u)
        inside = ((v >= 0) & (v <= maxq)).double()
        q = v.clamp(0, maxq).double()
        C = (g * (1 - inside)).sum(1, keepdim=True)
        S = (g * (q - torch.round(u).double() - inside * t.double())).sum(1, keepdim=True)
        d_hi = torch.where(keep, (S + u.double() * C) / maxq, 0.0)
        d_lo = C - d_hi
    d_lo, d_hi = d_lo * clip, d_hi * clip
    if zir:
        d_lo, d_hi = torch.where(lo0 <= 0, d_lo, 0.0), torch.where(hi0 >= 0, d_hi, 0.0)
    at_lo, at_hi = (xf == lo0).double(), (xf == hi0).double()
    dx = g * inside
    if range_terms:
        dx = dx + at_lo * d_lo / at_lo.sum(1, keepdim=True) + at_hi * d_hi / at_hi.sum(1, keepdim=True)
    return dx.reshape(x.shape)


def _extremes(x, groupsize):
    gs = groupsize if groupsize > 0 else x.shape[-1]
    xf = x.float().reshape(-1, gs)
    return ((xf == xf.amin(1, keepdim=True)) | (xf == xf.amax(1, keepdim=True))).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_bits_and_gradient_match_reference(dtype):
    """Every runtime case (kernels._AUTO_CASES) at 4 and 8 bits, on a width that is not a power of two:
    the values bit for bit, the gradient within RTOL, and bit for bit away from each row's min and max."""
    x = _inputs((10, 192)).to(dtype)
    up = _upstream(x)
    for bits in (4, 8):
        for sym, clip, g, zir in K._AUTO_CASES:
            args = (bits, sym, clip, g, zir)
            y, dx = _kernel(x, up, *args)
            ref = fake_quant_act(x, *args)
            assert torch.equal(y, ref) and torch.equal(torch.signbit(y), torch.signbit(ref)), args
            want = _reference_grad(x, up, *args)
            assert dx.dtype == dtype and _close(dx, want), (args, (dx.float() - want.float()).abs().max())
            inner = ~_extremes(x, g)
            assert torch.equal(dx[inner], want[inner]), args


def test_gradient_is_the_derived_formula():
    """In fp32 the kernel is the docstring's formula (evaluated in float64) to 1e-6 of max|grad|, and so is
    the reference's autograd to RTOL: the derivation is the reference's gradient, summed more accurately."""
    x = _inputs((10, 192))
    up = _upstream(x)
    for bits in (2, 4, 8):
        for sym, clip, g, zir in K._AUTO_CASES + ((False, 0.9, 32, False), (True, 1.0, 64, True)):
            args = (bits, sym, clip, g, zir)
            exact = _derived_grad(x, up, *args)
            scale = exact.abs().max()
            assert ((_kernel(x, up, *args)[1].double() - exact).abs() <= 1e-6 * scale).all(), args
            assert ((_reference_grad(x, up, *args).double() - exact).abs() <= RTOL * scale).all(), args


def test_dropping_the_range_terms_fails_the_check():
    """The check above catches a backward without the min/max terms: the old pure straight-through one (grad
    passed unchanged) and the clamp-masked one (g·p), in every case."""
    x = _inputs((10, 192))
    up = _upstream(x)
    for bits in (4, 8):
        for sym, clip, g, zir in K._AUTO_CASES:
            args = (bits, sym, clip, g, zir)
            want = _reference_grad(x, up, *args)
            assert not _close(up, want), args
            assert not _close(_derived_grad(x, up, *args, range_terms=False).float(), want), args


def test_long_rows_loop_over_chunks():
    """Rows of 32768 (a 32K down_proj input): 8 chunks of GRAD_TILE, the minimum tied across two chunks."""
    x = _inputs((10, 32768), seed=2)
    x[0, 5] = x[0, 20000] = x[0].min() - 1
    up = _upstream(x)
    for args in ((4, False, 1.0, -1, None), (8, True, 0.9, -1, None)):
        y, dx = _kernel(x, up, *args)
        assert torch.equal(y, fake_quant_act(x, *args))
        want = _reference_grad(x, up, *args)
        assert _close(dx, want), args


def test_runtime_dispatch():
    """ActSpec(ste=True, kernels="triton") under autograd runs the kernels' Function (the SpinQuant training
    path, spinquant._set_ste); without ste a gradient-needing call keeps the reference graph."""
    from osp_eval.runtime import ActSpec

    x = _inputs((10, 128), seed=3).requires_grad_(True)
    y = ActSpec(4, False, 0.9, -1, ste=True, kernels="triton")(x)
    assert "FakeQuantSTE" in y.grad_fn.name()
    ref = ActSpec(4, False, 0.9, -1, ste=True)(x)
    assert torch.equal(y, ref)
    up = _upstream(x)
    assert _close(torch.autograd.grad(y, x, up)[0], torch.autograd.grad(ref, x, up)[0])
    assert "FakeQuantSTE" not in ActSpec(4, False, 0.9, -1, kernels="triton")(x).grad_fn.name()
    assert not K.use_triton("auto", x, backward=True)  # auto: CUDA only


def test_auto_checks_the_backward(monkeypatch):
    """auto's once-per-device check accepts this backward and rejects the old pure straight-through one."""
    assert K._auto_grad_ok.__wrapped__(torch.device("cpu"))
    monkeypatch.setattr(K, "fake_quant_act_triton_grad", lambda x, grad, *args: grad)
    with pytest.warns(UserWarning, match="gradient differs"):
        assert not K._auto_grad_ok.__wrapped__(torch.device("cpu"))


def test_rotation_training_step_uses_the_kernel(monkeypatch):
    """A tiny Llama prepared for SpinQuant training (W16A4KV4): with --kernels triton every activation, K and V
    quantizer's backward is the kernel's, the loss is the reference's bit for bit and the R1/R2 gradients
    agree to 1e-4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osp_eval import preset
    from osp_eval.spinquant import prepare_training_model

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))

    def step(kernels):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        rot = prepare_training_model(model, preset("osp", w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                                                   w_method="gptq", kernels=kernels))
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad for p in rot.parameters()]

    calls = []
    grad = K.fake_quant_act_triton_grad
    monkeypatch.setattr(K, "fake_quant_act_triton_grad", lambda *a: calls.append(a[2:]) or grad(*a))
    ref_loss, ref = step("reference")
    assert not calls
    loss, got = step("triton")
    # per layer: the inputs of q, k, v, gate, up (each its own node under autograd), down; o_proj per head; K; V
    assert len(calls) == 2 * 9 and {c[3] for c in calls} == {-1, 16}
    assert torch.equal(loss, ref_loss)
    for a, b in zip(got, ref):
        assert b.abs().max() > 0 and K.grad_close(a, b, 1e-4)




def test_backward_compiles_for_hopper():
    """The backward kernel (chunk loops, constexpr branches) compiles for sm_90 outside the interpreter, with
    IEEE division (the straight-through term is (g·s)/s, as autograd computes it)."""
    sig = {"x_ptr": "*bf16", "g_ptr": "*bf16", "dx_ptr": "*bf16", "M": "i32", "G": "i32", "clip": "fp32",
           "maxq": "fp32", "inv_maxq": "fp32",
           **{k: "constexpr" for k in ("SYM", "ZERO_IN_RANGE", "CLIP", "RECIP", "BF16", "BLOCK_M", "BLOCK_G")}}
    variants = [{"SYM": sym, "ZERO_IN_RANGE": True, "CLIP": True, "RECIP": True, "BF16": True, "BLOCK_M": 1,
                 "BLOCK_G": 4096} for sym in (False, True)]
    ptx = sm90_ptx("_fake_quant_rows_grad", sig, variants, num_warps=8)
    assert ["div.rn.f32" in p for p in ptx] == [True, True]

def test_gradient_kernel_only_for_fast_and_triton(monkeypatch):
    """The backward kernel sums in another order than autograd, so auto (the reference's numbers) trains through
    autograd even where the forward kernel runs; fast (after its check) and triton (forced) take the kernel."""
    from types import SimpleNamespace

    monkeypatch.setattr(K, "_auto_ok", lambda device: True)  # as on a GPU whose checks passed
    monkeypatch.setattr(K, "_auto_grad_ok", lambda device: True)
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")  # what the choice reads
    if K.triton_available():
        assert K.use_triton("auto", x) and K.use_triton("fast", x)
        assert K.use_triton("fast", x, backward=True) and K.use_triton("triton", x, backward=True)
    assert not K.use_triton("auto", x, backward=True) and not K.use_triton("reference", x, backward=True)
