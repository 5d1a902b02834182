"""The Triton MSE clip search (kernels.weight_clip_search_triton) against quant.weight_qparams' loop.

The candidates' grid points are the reference's bit for bit; the errors' power and summation order are not, so a
row could only pick another candidate where two errors are within float rounding of each other (a near-tie):
`_assert_same_choice` accepts such a row only with the reference's own errors of both picks within 1e-5.
On these inputs no row flips. Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py).
"""

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import osp_eval.kernels as K  # noqa: E402
from osp_eval.quant import (CLIP_NORM, clip_candidates, fake_quant_weight, quantize_dequant,  # noqa: E402
                            weight_qparams, weight_range)

DEVICES = (["cpu"] if K._interpret() else []) + (["cuda"] if torch.cuda.is_available() else [])


def _weights(rows=14, cols=300, seed=0):
    """Rows over 3 decades, with the rows that break a clip search: an outlier, all zero, constant, one-signed,
    values so small that the 1e-5 range floor makes every candidate the same, and a single nonzero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, cols)[torch.randperm(cols, generator=g)]
    w[1, cols // 3] = 400.0
    w[2] = 0
    w[3] = 0.75
    w[4] = w[4].abs()
    w[5] = -w[5].abs()
    w[6] = w[6] * 1e-8
    w[7] = 0
    w[7, 4] = -2.5
    return w


def _reference_errors(w, bits, sym):
    """The reference loop's own error of every candidate (torch's pow and sum), [rows, candidates]."""
    scale, zero = clip_candidates(*weight_range(w), bits, sym)
    return torch.stack([(quantize_dequant(w, scale[:, k:k + 1], zero[:, k:k + 1], bits, sym) - w).abs()
                        .pow(CLIP_NORM).sum(1) for k in range(scale.shape[1])], 1)


def _assert_same_choice(w, bits, sym, got, want):
    differ = ((got[0] != want[0]) | (got[1] != want[1]))[:, 0]
    if differ.any():  # only a near-tie may flip: both picks' reference errors within float rounding
        err = _reference_errors(w, bits, sym)
        scale, _ = clip_candidates(*weight_range(w), bits, sym)
        for r in differ.nonzero()[:, 0].tolist():
            a = (scale[r] == got[0][r]).nonzero()[0, 0]
            b = (scale[r] == want[0][r]).nonzero()[0, 0]
            assert abs(err[r, a] - err[r, b]) <= 1e-5 * err[r, b], (bits, sym, r, err[r, a], err[r, b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sym", (True, False))
def test_clip_kernel_picks_the_reference_scales(device, sym):
    for shape in ((14, 300), (8, 2500)):  # 2500: more than one column chunk, masked lanes in the last
        w = _weights(*shape).to(device)
        for bits in (2, 3, 4, 8):
            got = K.weight_clip_search_triton(w, bits, sym)
            want = weight_qparams(w, bits, sym, clip_search=True)
            assert got[0].shape == want[0].shape == got[1].shape == (shape[0], 1)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (shape, bits)
            _assert_same_choice(w, bits, sym, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_fake_quant_weight_through_the_kernel(device):
    w = _weights(12, 256).to(device)
    for sym in (True, False):
        for bits in (2, 3, 4, 8):
            for groupsize in (-1, 64):
                want = fake_quant_weight(w, bits, groupsize, sym, clip_search=True)
                got = fake_quant_weight(w, bits, groupsize, sym, clip_search=True, kernels="triton")
                assert torch.equal(got, want), (sym, bits, groupsize)
    wb = w.bfloat16()
    assert torch.equal(fake_quant_weight(wb, 4, clip_search=True, kernels="triton"),
                       fake_quant_weight(wb, 4, clip_search=True))


def test_first_min_is_the_reference_rule():
    """The loop keeps a candidate when err < best, best starting at inf: the first smallest error; NaN never
    wins; no finite error keeps candidate 0 (p = 1)."""
    inf, nan = float("inf"), float("nan")
    err = torch.tensor([[3.0, 1.0, 1.0, 2.0], [nan, 2.0, 1.0, 1.0], [inf, inf, inf, inf], [nan, nan, nan, nan],
                        [5.0, inf, nan, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert K.first_min(err).tolist() == [1, 2, 0, 0, 3, 0]


def _brute_force(row: np.ndarray, bits: int, sym: bool):
    """Index into p = 1 - i/100 (i < 80) of the smallest sum |q - w|^2.4, in float64, and the margin to the
    runner-up (relative): written from the definition, sharing no code with osp_eval."""
    errs = []
    for i in range(80):
        p = 1 - i / 100
        lo, hi = min(row.min(), 0) * p, max(row.max(), 0) * p
        if sym:
            maxq = 2 ** (bits - 1) - 1
            s = max(max(-lo, hi), 1e-5) / maxq
            q = np.clip(np.round(row / s), -maxq - 1, maxq) * s
        else:
            maxq = 2**bits - 1
            s = max(hi - lo, 1e-5) / maxq
            z = np.round(-lo / s)
            q = (np.clip(np.round(row / s) + z, 0, maxq) - z) * s
        errs.append((np.abs(q - row) ** 2.4).sum())
    errs = np.array(errs)
    best = int(errs.argmin())
    return best, (np.delete(errs, best).min() - errs[best]) / errs[best]


@pytest.mark.parametrize("sym", (True, False))
def test_chosen_shrink_is_the_float64_optimum(sym):
    """A wrong p grid (offset, step, count) or selection rule picks another p than a float64 brute force on rows
    with one clear optimum inside the grid; rows where every candidate is the same (all zero, below the range
    floor) must keep the first, p = 1."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 48, generator=g) * torch.randn(10, 48, generator=g).exp()  # heavy tails: p from 1 to 0.59
    w[8] = 0
    w[9] = w[9] * 1e-7
    scale, zero = clip_candidates(*weight_range(w), 3, sym)
    picked = K.first_min(K.clip_errors_triton(w, scale, zero, 3, sym)).tolist()
    assert picked[8:] == [0, 0]
    for r in range(8):
        best, margin = _brute_force(w[r].double().numpy(), 3, sym)
        assert margin > 1e-4, (r, best, margin)  # the test's premise: one clear optimum (fp32 sums agree on it)
        assert picked[r] == best, (r, picked[r], best)
    assert len(set(picked[:8])) >= 6  # the rows test different parts of the grid
    got = K.weight_clip_search_triton(w, 3, sym)
    assert torch.equal(got[0][:, 0], scale[torch.arange(10), picked])


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_runs_with_the_clip_kernel(device):
    """gptq_quantize_weight(kernels="triton") fits its scales (per row, static and dynamic groups) with the kernel
    and gives the reference's weights here."""
    from osp_eval.gptq import gptq_quantize_weight

    g = torch.Generator().manual_seed(2)
    W = (torch.randn(24, 128, generator=g) * torch.logspace(-1, 1, 128)).to(device)
    X = torch.randn(300, 128, generator=g)
    H = (X.t() @ X).to(device)
    for kw in ({}, {"groupsize": 32}, {"groupsize": 32, "act_order": True, "static_groups": True}):
        for sym in (True, False):
            want = gptq_quantize_weight(W, H, 3, sym=sym, clip_search=True, **kw)
            got = gptq_quantize_weight(W, H, 3, sym=sym, clip_search=True, kernels="triton", **kw)
            assert torch.equal(got, want), (kw, sym)


def test_reference_and_cpu_auto_never_call_the_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the clip kernel ran")

    monkeypatch.setattr(K, "weight_clip_search_triton", boom)
    w = _weights(8, 64)
    for kernels in ("reference", "auto"):
        weight_qparams(w, 4, True, clip_search=True, kernels=kernels)
        fake_quant_weight(w, 4, 32, False, clip_search=True, kernels=kernels)


def test_only_fast_and_triton_take_the_clip_kernel(monkeypatch):
    """The kernel's error sums round otherwise than the reference's, so auto (the reference's numbers) never takes
    it, even where Triton would run; fast (after its check) and triton (forced) do."""
    from types import SimpleNamespace

    monkeypatch.setattr(K, "_auto_ok", lambda device: True)  # as on a GPU whose checks passed
    monkeypatch.setattr(K, "_clip_auto_ok", lambda device: True)
    gpu_weight = SimpleNamespace(is_cuda=True, dtype=torch.float32, device="cuda:0")  # what the choice reads
    if K.triton_available():
        assert K.use_clip_kernel("fast", gpu_weight) and K.use_clip_kernel("triton", gpu_weight)
    assert not K.use_clip_kernel("auto", gpu_weight) and not K.use_clip_kernel("reference", gpu_weight)
