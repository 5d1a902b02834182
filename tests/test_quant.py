"""Quantizers against hand-computed values and an independent clip-search implementation."""

import numpy as np
import pytest
import torch

from osp_eval.quant import fake_quant_act, fake_quant_weight, weight_qparams


def test_weight_sym_per_channel_hand_values():
    w = torch.tensor([[1.0, -0.55, 0.25, 0.7], [0.22, 0.1, -0.4, 0.0]])
    q = fake_quant_weight(w, 4, sym=True)
    # row 0: s = 1/7; codes round(w*7) = 7, -4, 2, 5 (clamped to [-8, 7])
    assert torch.allclose(q[0], torch.tensor([7, -4, 2, 5]) / 7)
    # row 1: s = 0.4/7; codes 3.85->4, 1.75->2, -7, 0
    assert torch.allclose(q[1], torch.tensor([4, 2, -7, 0]) * 0.4 / 7)


def test_weight_asym_uses_zero_point():
    w = torch.tensor([[-1.0, 0.0, 2.0, 0.3]])
    q = fake_quant_weight(w, 4, sym=False)
    # s = 3/15 = 0.2, z = 5: -1 -> 0, 0 -> 5, 2 -> 15, 0.3 -> round(1.5)=2 -> 7 => (7-5)*0.2
    assert torch.allclose(q, torch.tensor([[-1.0, 0.0, 2.0, 0.4]]))


def test_weight_groups_equal_separate_rows():
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    g = fake_quant_weight(w, 3, groupsize=4, sym=True)
    sep = torch.cat([fake_quant_weight(w[:, :4].contiguous(), 3), fake_quant_weight(w[:, 4:].contiguous(), 3)], 1)
    assert torch.equal(g, sep)
    assert not torch.equal(g, fake_quant_weight(w, 3))


def _clip_search_reference(row: np.ndarray, bits: int) -> float:
    """Independent numpy re-implementation of the reference's symmetric MSE grid search: returns the scale."""
    maxq = 2 ** (bits - 1) - 1
    amax = max(abs(min(row.min(), 0)), max(row.max(), 0))
    best, best_s = np.inf, None
    for i in range(80):
        s = (1 - i / 100) * amax / maxq
        q = np.clip(np.round(row / s), -maxq - 1, maxq) * s
        err = np.sum(np.abs(q - row) ** 2.4)
        if err < best:
            best, best_s = err, s
    return best_s


def test_clip_search_picks_the_right_shrink():
    # One outlier at 1.0 and many values at 0.3: shrinking the range so 0.3 lands near a grid point wins.
    row = np.array([1.0] + [0.3] * 20, dtype=np.float32)
    scale, _ = weight_qparams(torch.from_numpy(row)[None], 3, sym=True, clip_search=True)
    expected = _clip_search_reference(row.astype(np.float64), 3)
    assert expected < 1.0 / 3 - 1e-3  # the crafted row really needs clipping
    assert scale.item() == pytest.approx(expected, rel=1e-5)
    # ...and the clipped grid beats plain RTN on the |err|^2.4 criterion
    t = torch.from_numpy(row)[None]
    err = lambda q: (q - t).abs().pow(2.4).sum().item()
    assert err(fake_quant_weight(t, 3, clip_search=True)) < err(fake_quant_weight(t, 3))


def test_act_per_token_asym_keeps_zero_in_range():
    x = torch.tensor([[-1.0, 0.0, 2.0], [0.5, 0.9, 2.0]])
    q = fake_quant_act(x, 2)  # row 0: s=1, z=1 -> exact; row 1: lo=0, hi=2
    assert torch.allclose(q[0], x[0])
    q4 = fake_quant_act(x[1:], 4)  # s = 2/15, z = 0: 0.5 -> round(3.75)=4
    assert torch.allclose(q4, torch.tensor([[4, 7, 15]]) * 2 / 15)


def test_act_all_zero_row_is_stable():
    x = torch.zeros(2, 4)
    assert torch.equal(fake_quant_act(x, 4), x)
    assert torch.equal(fake_quant_act(x, 4, groupsize=2), x)


def test_act_groupwise_uses_group_range():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # group path: lo=1, hi=4, s=1, z=-1 -> exact
    assert torch.allclose(fake_quant_act(x, 2, groupsize=4), x)
    # per-token path forces 0 into the range: s = 4/3
    assert torch.allclose(fake_quant_act(x, 2), torch.tensor([[1, 2, 2, 3]]) * 4 / 3)
    # the K path: groups of head_dim with 0 kept in range equals per-token on each head
    y = torch.randn(5, 16)
    assert torch.equal(fake_quant_act(y, 4, groupsize=8, zero_in_range=True),
                       torch.cat([fake_quant_act(y[:, :8], 4), fake_quant_act(y[:, 8:], 4)], 1))


def test_act_symmetric_with_clip():
    x = torch.tensor([[-2.0, 0.5, 1.0]])
    # sym 4-bit, clip 0.9: amax = 1.8, s = 1.8/7; codes clamp(round(x/s), -8, 7)
    s = 1.8 / 7
    expected = torch.clamp(torch.round(x / s), -8, 7) * s
    assert torch.allclose(fake_quant_act(x, 4, sym=True, clip_ratio=0.9), expected)
    assert fake_quant_act(x, 4, sym=True, clip_ratio=0.9)[0, 0] == pytest.approx(-8 * s)


def test_16_bits_is_identity_and_dtype_kept():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert fake_quant_act(x, 16) is x
    assert fake_quant_act(x, 4).dtype == torch.bfloat16
    assert fake_quant_weight(x, 4).dtype == torch.bfloat16


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    errs = [(fake_quant_weight(w, b, clip_search=True) - w).norm().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    a = torch.randn(16, 128)
    errs = [(fake_quant_act(a, b) - a).norm().item() for b in (2, 4, 8)]
    assert errs == sorted(errs, reverse=True)
