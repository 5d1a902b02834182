import functools
import hashlib
import math
import os
import types

import pytest
import torch

from osp_eval import hadamard as hadamard_module
from osp_eval.hadamard import (
    SUPPORTED_K,
    constructible,
    factor_size,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
    random_hadamard_matrix,
    random_signs,
    supported_orders,
    unsupported_message,
)

MAX_N = 16384
EXACT_MAX_N = 4096  # above this, checks avoid dense n x n float64 products (CI time/memory)
SIZES = sorted({k << e for k in (1, *SUPPORTED_K) for e in range(15) if k << e <= MAX_N})


def explicit(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x @ hadamard_matrix(n).T * scale, in float64, without a dense float64 n x n matrix."""
    n = x.shape[-1]
    h = hadamard_matrix(n, dtype=torch.int8)
    buf = torch.empty(min(n, 1024), n, dtype=torch.float64)  # reused: fresh chunks cost page faults
    cols = []
    for i in range(0, n, 1024):
        rows = buf[: min(1024, n - i)].copy_(h[i : i + 1024])
        cols.append(x.double() @ rows.T)
    return torch.cat(cols, -1) * scale


def digest(h: torch.Tensor) -> str:
    """First 16 hex digits of sha256 of the matrix as int8 bytes (see ORIGINAL_DIGESTS)."""
    return hashlib.sha256(memoryview(h.to(torch.int8).contiguous().numpy()).cast("B")).hexdigest()[:16]


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


@pytest.mark.parametrize("n", [0, -8, 3, 6, 7, 22, 92, 184, 232, 4 * 233, 127 * 2**10])
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
    assert digest(h) == ORIGINAL_DIGESTS[n][1]  # the matrix did not change when K became open-ended


@pytest.mark.parametrize("n", [n for n in SIZES if n > EXACT_MAX_N])
def test_hadamard_large_sizes(n):
    g = torch.Generator().manual_seed(n)
    h = hadamard_matrix(n, dtype=torch.int8)
    assert h.shape == (n, n)
    assert digest(h) == ORIGINAL_DIGESTS[n][1]  # the matrix did not change when K became open-ended
    idx = torch.randperm(n, generator=g)[:48]
    rows = h[idx].double()
    assert torch.equal(rows.abs(), torch.ones_like(rows))
    assert torch.equal(rows @ rows.T, n * torch.eye(48, dtype=torch.float64))
    # The fast transform is orthogonal and matches those rows of the matrix.
    x = torch.randn(16, n, generator=g, dtype=torch.float64)
    y = hadamard_transform(x)
    torch.testing.assert_close(y @ y.T, x @ x.T, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(y[:, idx], x @ rows.T / math.sqrt(n), rtol=1e-10, atol=1e-10)


TRANSFORM_SIZES = [1, 2, 8, 12, 20, 24, 40, 52, 64, 68, 100, 104, 156, 172, 240, 244, 576, 924, 1536, 4096, 5504,
                   5632, 11008]


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
    with pytest.raises(ValueError, match="92"):
        random_hadamard_matrix(92, 0)


def test_hadamard_matrix_returns_copy():
    h = hadamard_matrix(12, dtype=torch.int8)
    h.zero_()
    assert hadamard_matrix(12).abs().min() == 1


@pytest.mark.parametrize("n", [1024, 576, 11008, 4864])
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


# ---------------------------------------------------------------- orders beyond the original list
# (H_K itself is hadamard_module._base_matrix(K); hadamard_matrix(K) would reduce K = 2 * K/2.)

ORDERS = supported_orders(1000)


def test_supported_orders():
    assert supported_orders(40) == [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert all(k in (1, 2) or k % 4 == 0 for k in ORDERS) and set(SUPPORTED_K) < set(ORDERS)
    assert {68, 76, 84, 100, 148, 244, 924} < set(ORDERS)
    # Hadamard matrices of order 92 and 116 exist (Williamson, n = 23 / 29), but none is stored here.
    assert not constructible(92) and not constructible(116)
    assert not any(constructible(k) for k in (0, -4, 3, 6, 10, True, 12.0))


@pytest.mark.parametrize("k", ORDERS)
def test_every_order_up_to_1000_is_hadamard(k):
    h = hadamard_module._base_matrix(k)
    assert h.dtype == torch.int8 and h.shape == (k, k)
    assert torch.equal(h.abs(), torch.ones_like(h))
    hf = h.double()  # ±1 products summed in float64 are exact integers
    assert torch.equal(hf @ hf.T, k * torch.eye(k, dtype=torch.float64))


# FFN widths of current models (and other sizes to check) -> (K, construction of H_K).
MODEL_SIZES = {
    17408: (68, ("paley1", 67)),  # Qwen3-14B
    4864: (76, ("paley2", 37)),  # Qwen2.5-0.5B
    9728: (76, ("paley2", 37)),  # Qwen3-4B
    25600: (100, ("paley2", 49)),  # Qwen3-32B, GF(7^2)
    18944: (148, ("paley2", 73)),  # Qwen2.5-7B
    29568: (924, ("paley2", 461)),  # Qwen2.5-72B
    14336: (28, ("paley2", 13)),  # Llama-3-8B: 28 keeps Paley II q = 13 although Paley I q = 27 exists now
    # Phi-3 / Gemma sizes
    21504: (84, ("paley1", 83)),
    6912: (108, ("paley1", 107)),
    9216: (36, ("paley2", 17)),
    10240: (40, ("kron", 2, 20)),
    2048: (1, ("sylvester",)),
    8192: (1, ("sylvester",)),
    16384: (1, ("sylvester",)),
}


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes(n):
    k, how = MODEL_SIZES[n]
    assert is_supported(n) and factor_size(n) == (k, n // k)
    assert hadamard_module._construction(k) == how


def test_new_sizes_choose_the_smallest_k():
    assert factor_size(68) == (68, 1) and factor_size(136) == (68, 2)
    assert factor_size(200) == (100, 2)
    assert factor_size(44 * 3) == (132, 1)  # Paley I q = 131
    assert factor_size(8 * 233 * 2) == (3728, 1)  # 932 and 1864 have no construction, 3728 = 3727 + 1 does
    assert factor_size(80) == (40, 2)  # K_ORDER comes first: the smallest K would be 20


@pytest.mark.parametrize("n", [4864, 7392, 17408, 18944])  # K = 76, 924, 68, 148
def test_transform_matches_dense_matrix_new_sizes(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), explicit(x, 1 / math.sqrt(n)), rtol=1e-10, atol=1e-10)


def test_unsupported_message():
    msg = "no Hadamard construction for size 932 (4·233): nearest supported sizes are 928 and 936"
    assert unsupported_message(932) == msg and not is_supported(932)
    with pytest.raises(ValueError) as err:
        factor_size(932)
    assert str(err.value) == msg
    assert unsupported_message(92, "intermediate") == (
        "no Hadamard construction for intermediate = 92 (4·23): nearest supported sizes are 88 and 96")
    assert unsupported_message(7) == "no Hadamard construction for size 7: nearest supported sizes are 4 and 8"
    assert unsupported_message(0) == "no Hadamard construction for size 0: size must be a positive int"
    assert "\n" not in unsupported_message(127 * 2**10)


# ---------------------------------------------------------------- GF(q)


@pytest.mark.parametrize("q", [27, 49, 81, 125, 243, 343])
def test_finite_field(q):
    p, digits, _ = hadamard_module._field(q)
    mul = functools.partial(hadamard_module._gf_mul, q)
    chi = hadamard_module._quadratic_character(q)
    nonzero = torch.arange(1, q)
    table = mul(nonzero[:, None], nonzero[None, :])
    # Latin square on the nonzero elements: no zero divisors, every a != 0 has an inverse.
    assert torch.equal(table.sort(1).values, nonzero.expand(q - 1, -1))
    assert torch.equal(table.sort(0).values, nonzero[:, None].expand(-1, q - 1))
    assert torch.equal(chi[table], chi[nonzero][:, None] * chi[nonzero][None, :])  # chi is multiplicative
    assert chi[0] == 0 and (chi == 1).sum() == (q - 1) // 2
    # Distributive and associative on a sample (addition is digit-wise mod p).
    a, b, c = torch.randint(0, q, (3, 2000), generator=torch.Generator().manual_seed(q))

    def add(x, y):
        return hadamard_module._gf_index(q, (digits[x] + digits[y]) % p)

    assert torch.equal(mul(a, add(b, c)), add(mul(a, b), mul(a, c)))
    assert torch.equal(mul(a, mul(b, c)), mul(mul(a, b), c))


@pytest.mark.parametrize("p", [3, 5, 7, 11, 13, 17, 19, 23])
def test_gf_p2_modulus_is_the_original(p):
    # GF(p^2) = GF(p)[t] / (t^2 - r), r the smallest non-residue: the field the original code used.
    r = next(r for r in range(2, p) if all(x * x % p != r for x in range(p)))
    assert hadamard_module._irreducible(p, 2) == ((-r) % p, 0, 1)


# ---------------------------------------------------------------- matrices of the original sizes never change
# {n: (K, first 16 hex digits of sha256(hadamard_matrix(n) as int8 bytes))} for every n = K * 2^k <= 2^15 with
# K in the original list or K = 1, computed with the implementation before K became open-ended.
ORIGINAL_DIGESTS = {
    1: (1, "4bf5122f344554c5"), 2: (1, "ae0c359ec39763b6"), 4: (1, "14edb060b895542e"),
    8: (1, "7c99a8eda1a433af"), 12: (12, "96c4e95b8f52c8de"), 16: (1, "4173cdf0377bf83a"),
    20: (20, "e5d1e5dd287996d7"), 24: (12, "911488297b4cacf8"), 28: (28, "a24c9c5912c711a9"),
    32: (1, "0b71401da96bcee9"), 36: (36, "1a7aed2f42a8c71d"), 40: (40, "fddf7682308f9cb2"),
    44: (44, "f67bcf7e314abc96"), 48: (12, "a6c01463f2478a7a"), 52: (52, "0f34f05b9d09382d"),
    56: (28, "420a03c76a326b3a"), 60: (60, "249ae98f22299dea"), 64: (1, "4be469934f00a70b"),
    72: (36, "2ec64656b9adac49"), 80: (40, "4bb45115a5f91e9b"), 88: (44, "4c1bdee80a08046d"),
    96: (12, "3a2425b002f70d62"), 104: (52, "a70939c19f0407ab"), 108: (108, "1ec1116b816c108c"),
    112: (28, "557d4bce1588c2e4"), 120: (60, "eb2bd6757c38e3d2"), 128: (1, "6c75072bc838cd31"),
    140: (140, "6f6c84c918ab7eff"), 144: (36, "f5196bac92c7a680"), 156: (156, "a46de852c357c78d"),
    160: (40, "e8a0590663d78933"), 172: (172, "63919bf15aecb77f"), 176: (44, "c7dde42751bbf7df"),
    192: (12, "66e83e10476747e3"), 208: (52, "56f903ddbb6a20da"), 216: (108, "40dea7eb10d2cfe3"),
    224: (28, "de786d922658147d"), 240: (60, "3d300571ca2fadb4"), 256: (1, "48e8331c828232b2"),
    280: (140, "f0fd7cbf041beb3b"), 288: (36, "e2ded7f77500b3a9"), 312: (156, "16e0d8a910611ae5"),
    320: (40, "66a4165597a32ea4"), 344: (172, "17fa27e29aa410db"), 352: (44, "6e1cdd9a83d78c6c"),
    384: (12, "96247a3d2e779af2"), 416: (52, "8cc906691319aca9"), 432: (108, "e7c9097b4182906d"),
    448: (28, "e056776e07275338"), 480: (60, "7dd05d311f20b39a"), 512: (1, "6746c1ade12fafc8"),
    560: (140, "48943cb4f6b84962"), 576: (36, "4fc7e4b139b25575"), 624: (156, "396be7230ab74436"),
    640: (40, "0b8d9c124f111f20"), 688: (172, "d75e351b179e0081"), 704: (44, "6c17d4d080da68f2"),
    768: (12, "6c64696fee95cf79"), 832: (52, "ac9fac4594926736"), 864: (108, "cc2da36d741e7753"),
    896: (28, "543f15ab70a95944"), 960: (60, "29b7f51b113b895a"), 1024: (1, "5a173b88a228b188"),
    1120: (140, "9f41d8652f4d3909"), 1152: (36, "a1dda116ee953dd2"), 1248: (156, "3481e5320a1b2ce1"),
    1280: (40, "cf875747531922b3"), 1376: (172, "82bc73bc3301b091"), 1408: (44, "936f0e4180cb42c9"),
    1536: (12, "cfab86945d864db6"), 1664: (52, "46bbf5520f196777"), 1728: (108, "90c03cec10050a47"),
    1792: (28, "7298a5ebe1f88914"), 1920: (60, "c10de159b0010b82"), 2048: (1, "1b0bbe0b93141d45"),
    2240: (140, "5af9b43e3ebd8457"), 2304: (36, "87c37920d1649d0b"), 2496: (156, "1737eec20a82cdee"),
    2560: (40, "b45def1a9d2697ea"), 2752: (172, "a71867ab9f3d9aac"), 2816: (44, "bd57882cd44d878f"),
    3072: (12, "17eb19f6934c987f"), 3328: (52, "842732cd9bbacbaf"), 3456: (108, "fd52ea283b0b70f5"),
    3584: (28, "799241077fc65c70"), 3840: (60, "c255b8b90b03aa50"), 4096: (1, "1d9ba72dad9df866"),
    4480: (140, "7d35ceaca83ae4e2"), 4608: (36, "326fad14d9f3cacc"), 4992: (156, "0892ab2de8d29b58"),
    5120: (40, "3f4f65425fc020dd"), 5504: (172, "d641c53f16ae7e1a"), 5632: (44, "0b0aa0290ef821d0"),
    6144: (12, "53d35f33336e73a4"), 6656: (52, "7ba7dafb807cfe88"), 6912: (108, "d14f2dddde83dd0f"),
    7168: (28, "987530e92336f7c1"), 7680: (60, "a611501b36cd76c3"), 8192: (1, "b3d718a0b6674e90"),
    8960: (140, "960fb28ebed72f37"), 9216: (36, "9ed56054f9f982f9"), 9984: (156, "92afc569e1654825"),
    10240: (40, "936da7a4e5ca7f80"), 11008: (172, "39f4f0b12390177b"), 11264: (44, "6ae7a1ee123a9de3"),
    12288: (12, "ba3d77e899cba8dc"), 13312: (52, "d346e5bbc3428294"), 13824: (108, "14f7a151b5e4910b"),
    14336: (28, "877e8c976df0b7f9"), 15360: (60, "7947bbaa8eb4fc42"), 16384: (1, "df9b39a73ac98ea7"),
    17920: (140, "3e6c85b854cc22d8"), 18432: (36, "324bb9d63992cad2"), 19968: (156, "3c22ea2c18f433ea"),
    20480: (40, "0e213aa36f341fbe"), 22016: (172, "e580876e3fb86fdd"), 22528: (44, "7b949112bb30177c"),
    24576: (12, "33edee375285115a"), 26624: (52, "40f70ddb0d5aaa17"), 27648: (108, "bf9b2e58484f129d"),
    28672: (28, "b1b353c999f44514"), 30720: (60, "57d1f5f4b8672993"), 32768: (1, "f23995a4930447df"),
}


def test_original_sizes_keep_their_k():
    assert set(SIZES) == {n for n in ORIGINAL_DIGESTS if n <= MAX_N}  # whose digests the tests above check
    for n, (k, _) in ORIGINAL_DIGESTS.items():
        assert factor_size(n) == (k, n // k)


@pytest.mark.skipif(os.environ.get("OSP_EVAL_SLOW_TESTS") != "1", reason="set OSP_EVAL_SLOW_TESTS=1: ~7 GiB to build "
                    "and hash; H_n = kron(H_K, H_m), and K, H_K, H_m are checked at smaller n")
@pytest.mark.parametrize("n", [n for n in sorted(ORIGINAL_DIGESTS) if n > MAX_N])
def test_original_large_sizes_are_bit_identical(n):
    h = hadamard_module._hadamard_int8(n)  # the cached matrix, not a copy (up to 1 GiB)
    hadamard_module._hadamard_int8.cache_clear()
    assert digest(h) == ORIGINAL_DIGESTS[n][1]
