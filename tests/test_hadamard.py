import math

import types

import pytest
import torch

from osp_eval import hadamard as hadamard_module
from osp_eval.hadamard import (
    SUPPORTED_K,
    factor_size,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
    random_hadamard_matrix,
    random_signs,
)

MAX_N = 16384
EXACT_MAX_N = 4096  # above this, checks avoid dense n x n float64 products (CI time/memory)
SIZES = sorted({k << e for k in (1, *SUPPORTED_K) for e in range(15) if k << e <= MAX_N})


def explicit(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x @ hadamard_matrix(n).T * scale, in float64, without a dense float64 n x n matrix."""
    n = x.shape[-1]
    h = hadamard_matrix(n, dtype=torch.int8)
    cols = [x.double() @ h[i : i + 1024].double().T for i in range(0, n, 1024)]
    return torch.cat(cols, -1) * scale


def test_factor_size_follows_reference_order():
    assert factor_size(1) == (1, 1)
    assert factor_size(4096) == (1, 4096)
    assert factor_size(576) == (36, 16)
    assert factor_size(1536) == (12, 128)
    assert factor_size(11008) == (172, 64)
    assert factor_size(5632) == (44, 128)
    assert factor_size(24) == (12, 2)  # 12 is tried last
    assert factor_size(80) == (40, 2)  # 40 before 20
    assert factor_size(216) == (108, 2)  # 108 before 36 and 12
    assert factor_size(120) == (60, 2)  # 60 before 12
    assert factor_size(112) == (28, 4)  # 7 * 16 is supported through 28 * 4
    assert factor_size(7 << 14) == (28, 1 << 12)


@pytest.mark.parametrize("n", [0, -8, 3, 6, 7, 22, 100, 200, 264, 44 * 3, 17 * 2**10])
def test_unsupported_size_raises(n):
    assert not is_supported(n)
    with pytest.raises(ValueError, match=rf"size {n}\b"):
        factor_size(n)
    with pytest.raises(ValueError, match=rf"size {n}\b"):
        hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError, match=rf"size {n}\b"):
            hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("n", [n for n in SIZES if n <= EXACT_MAX_N])
def test_hadamard_matrix_exact(n):
    assert is_supported(n)
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    # ±1 products summed in float64 are exact integers, so demand exact equality.  Above
    # 2048 the (exact, integer) fast transform computes h @ h.T in O(n^2 log n) instead.
    gram = h @ h.T if n <= 2048 else hadamard_transform(h, scale=1.0)
    assert torch.equal(gram, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [n for n in SIZES if n > EXACT_MAX_N])
def test_hadamard_large_sizes(n):
    g = torch.Generator().manual_seed(n)
    h = hadamard_matrix(n, dtype=torch.int8)
    assert h.shape == (n, n)
    idx = torch.randperm(n, generator=g)[:48]
    rows = h[idx].double()
    assert torch.equal(rows.abs(), torch.ones_like(rows))
    assert torch.equal(rows @ rows.T, n * torch.eye(48, dtype=torch.float64))
    # The fast transform is orthogonal and matches those rows of the matrix.
    x = torch.randn(16, n, generator=g, dtype=torch.float64)
    y = hadamard_transform(x)
    torch.testing.assert_close(y @ y.T, x @ x.T, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(y[:, idx], x @ rows.T / math.sqrt(n), rtol=1e-10, atol=1e-10)


TRANSFORM_SIZES = [1, 2, 8, 12, 20, 24, 40, 52, 64, 104, 156, 172, 240, 576, 1536, 4096, 5504, 5632, 11008]


@pytest.mark.parametrize("n", TRANSFORM_SIZES)
def test_transform_matches_matrix_float64(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    ref = explicit(x, 1.0)
    torch.testing.assert_close(hadamard_transform(x), ref / math.sqrt(n), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hadamard_transform(x, scale=1.0), ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(hadamard_transform(x, scale=0.5), ref * 0.5, rtol=1e-10, atol=1e-9)
    # Integer-valued input: the unnormalised float64 transform is exact.
    xi = torch.randint(-3, 4, (4, n), generator=g).double()
    assert torch.equal(hadamard_transform(xi, scale=1.0), explicit(xi, 1.0))


@pytest.mark.parametrize("n", [8, 172, 576, 1536, 5632, 11008])
def test_transform_matches_matrix_float32(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, explicit(x, 1 / math.sqrt(n)).float(), rtol=1e-4, atol=1e-4)


def test_sylvester_transform_is_involution():
    # Sylvester matrices are symmetric, so the normalised transform is its own inverse.
    x = torch.randn(4, 2048, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x)


def test_transform_edge_cases():
    assert hadamard_transform(torch.zeros(0, 576)).shape == (0, 576)
    x = torch.randn(7)
    torch.testing.assert_close(hadamard_transform(x[None, :1]), x[None, :1])  # n = 1 is the identity
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4, 8, dtype=torch.int64))
    # Non-contiguous input.
    x = torch.randn(12, 40, dtype=torch.float64).T
    torch.testing.assert_close(hadamard_transform(x), explicit(x, 1 / math.sqrt(12)))


@pytest.mark.parametrize("n", [512, 1536, 11008])
def test_half_precision(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, n, generator=g).to(torch.bfloat16)
    ref = hadamard_transform(x.double())
    for fp32 in (False, True):
        y = hadamard_transform(x, fp32=fp32)
        assert y.dtype == torch.bfloat16
        rel = (y.double() - ref).norm() / ref.norm()
        assert rel < 2e-2, (fp32, rel)
    # fp16 with large values: per-factor normalisation keeps intermediates finite.
    x16 = torch.full((2, n), 1000.0, dtype=torch.float16)
    y16 = hadamard_transform(x16)
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(y16.double(), hadamard_transform(x16.double()), rtol=2e-2, atol=2.0)


@pytest.mark.parametrize("n", [64, 172, 576])
def test_random_hadamard_matrix(n):
    q = random_hadamard_matrix(n, 7)
    assert q.shape == (n, n) and q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_hadamard_matrix(n, 7))
    assert torch.equal(q, random_hadamard_matrix(n, torch.Generator().manual_seed(7)))
    assert not torch.equal(q, random_hadamard_matrix(n, 8))
    # Documented definition: s = randint(0, 2) * 2 - 1 and x @ Q == hadamard_transform(x * s).
    s = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(7)) * 2 - 1
    assert torch.equal(s, random_signs(n, 7))
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(x @ q, hadamard_transform(x * s))
    torch.testing.assert_close(q, torch.diag(s.double()) @ hadamard_matrix(n).T / math.sqrt(n))


def test_random_hadamard_global_rng_and_dtype():
    torch.manual_seed(123)
    q1 = random_hadamard_matrix(40, None, dtype=torch.float32)
    torch.manual_seed(123)
    q2 = random_hadamard_matrix(40)
    assert q1.dtype == torch.float32
    torch.testing.assert_close(q1.double(), q2)
    with pytest.raises(ValueError, match="100"):
        random_hadamard_matrix(100, 0)


def test_hadamard_matrix_returns_copy():
    h = hadamard_matrix(12, dtype=torch.int8)
    h.zero_()
    assert hadamard_matrix(12).abs().min() == 1


@pytest.mark.parametrize("n", [1024, 576, 11008])
def test_fast_hadamard_transform_path(monkeypatch, n):
    # The CUDA kernel is not installed here: stand in a reference with its signature
    # (Sylvester transform of the last dim times scale) to check how the result is composed.
    calls = []

    def fake(x, scale=1.0):
        calls.append(x.shape[-1])
        return x @ hadamard_matrix(x.shape[-1], x.dtype).T * scale

    monkeypatch.setattr(hadamard_module, "_fht_for", lambda x: types.SimpleNamespace(hadamard_transform=fake))
    x = torch.randn(3, n, dtype=torch.float32)
    y = hadamard_transform(x, scale=0.25)
    assert calls == [factor_size(n)[1]]
    torch.testing.assert_close(y, explicit(x, 0.25).float(), rtol=1e-4, atol=1e-4)
