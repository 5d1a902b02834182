"""Hadamard matrices and fast Hadamard transforms over the last dimension.

Sizes are n = 2^k or n = K * 2^k with K in SUPPORTED_K.  The matrix is
H_n = kron(H_K, H_{2^k}): H_{2^k} is Sylvester's, H_K a fixed K x K Hadamard matrix:

  K              construction
  12, 20, 44,    Paley I with q = 11, 19, 43, 59, 107, 139 (q prime, q = 3 mod 4)
  60, 108, 140
  28, 36, 52     Paley II with q = 13, 17, 25 (25 uses GF(25) arithmetic)
  40             kron(H_2, H_20)
  156, 172       Williamson array from Williamson matrices of order 39 / 43, found by
                 benchmarks/search_williamson.py (first rows in _hadamard_tables.py)

Public API: hadamard_matrix, hadamard_transform, random_hadamard_matrix, random_signs,
factor_size, is_supported.
"""

from __future__ import annotations

import functools
import math

import torch

from ._hadamard_tables import WILLIAMSON_FIRST_ROWS

# Decomposition order: the first K (in this order) dividing n with a power-of-two
# quotient wins.  It is the reference implementation's order, so matrices match it.
K_ORDER: tuple[int, ...] = (172, 156, 140, 108, 60, 52, 36, 28, 44, 40, 20, 12)
SUPPORTED_K: tuple[int, ...] = tuple(sorted(K_ORDER))

_PALEY_I = {12: 11, 20: 19, 44: 43, 60: 59, 108: 107, 140: 139}  # K -> q, K = q + 1
_PALEY_II = {28: 13, 36: 17, 52: 25}  # K -> q, K = 2 (q + 1)
_WILLIAMSON = {156: 39, 172: 43}  # K -> n, K = 4 n

_SYLVESTER_CHUNK_BITS = 7  # dense factors of the 2^k part are at most 128 x 128
_FHT_MAX = 32768  # fast_hadamard_transform's largest supported size


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def factor_size(n: int) -> tuple[int, int]:
    """Return (K, m) with n = K * m, m a power of two, K = 1 or in SUPPORTED_K."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"no Hadamard construction for size {n!r}: size must be a positive int")
    for k in K_ORDER:
        if n % k == 0 and _is_pow2(n // k):
            return k, n // k
    if _is_pow2(n):
        return 1, n
    raise ValueError(
        f"no Hadamard construction for size {n}: supported sizes are 2^k or K*2^k "
        f"with K in {{{', '.join(map(str, SUPPORTED_K))}}}"
    )


def is_supported(n: int) -> bool:
    try:
        factor_size(n)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- constructions
# Built as int64 on CPU (exact), checked once, stored as int8.


def _sylvester(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(x_j - x_i) over GF(q), q = p or p^2, chi the quadratic character."""
    p = next(p for p in range(2, q + 1) if q % p == 0)
    if q not in (p, p * p):
        raise NotImplementedError(f"GF({q}) not implemented")
    # GF(p^2) = GF(p)[t] / (t^2 - r) with r a non-residue; element index = a + p*b.
    r = next(r for r in range(2, p) if all(x * x % p != r for x in range(p))) if q > p else 0
    idx = torch.arange(q)
    a, b = idx % p, idx // p
    sq = (a * a + r * b * b) % p + p * ((2 * a * b) % p)
    is_square = torch.zeros(q, dtype=torch.bool)
    is_square[sq[1:]] = True
    chi = torch.where(is_square, 1, -1)
    chi[0] = 0
    diff = (a[None, :] - a[:, None]) % p + p * ((b[None, :] - b[:, None]) % p)
    return chi[diff]


def _paley_i(q: int) -> torch.Tensor:
    # q = 3 mod 4: Q is skew, S = [[0, 1^T], [-1, Q]] is a skew conference matrix, H = I + S.
    ones = torch.ones(q, 1, dtype=torch.int64)
    s = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.int64), ones.T], 1),
                   torch.cat([-ones, _jacobsthal(q)], 1)], 0)
    return torch.eye(q + 1, dtype=torch.int64) + s


def _paley_ii(q: int) -> torch.Tensor:
    # q = 1 mod 4: C = [[0, 1^T], [1, Q]] is a symmetric conference matrix;
    # H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
    ones = torch.ones(q, 1, dtype=torch.int64)
    c = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.int64), ones.T], 1),
                   torch.cat([ones, _jacobsthal(q)], 1)], 0)
    return (torch.kron(c, torch.tensor([[1, 1], [1, -1]]))
            + torch.kron(torch.eye(q + 1, dtype=torch.int64), torch.tensor([[1, -1], [-1, -1]])))


def _circulant(row: list[int]) -> torch.Tensor:
    n = len(row)
    i = torch.arange(n)
    return torch.tensor(row, dtype=torch.int64)[(i[None, :] - i[:, None]) % n]


def _williamson(n: int) -> torch.Tensor:
    a, b, c, d = (_circulant(r) for r in WILLIAMSON_FIRST_ROWS[n])
    return torch.cat([torch.cat(blocks, 1) for blocks in
                      ([a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a])], 0)


@functools.lru_cache(maxsize=None)
def _base_matrix(k: int) -> torch.Tensor:
    """The fixed K x K Hadamard matrix (int8, CPU)."""
    if k == 1:
        h = torch.ones(1, 1, dtype=torch.int64)
    elif k in _PALEY_I:
        h = _paley_i(_PALEY_I[k])
    elif k in _PALEY_II:
        h = _paley_ii(_PALEY_II[k])
    elif k == 40:
        h = torch.kron(_sylvester(2), _base_matrix(20)).long()
    elif k in _WILLIAMSON:
        h = _williamson(_WILLIAMSON[k])
    else:
        raise ValueError(f"no base Hadamard matrix of order {k}")
    # Cheap (k <= 172) guard against a broken construction or table.
    if h.shape != (k, k) or not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64)):
        raise RuntimeError(f"internal error: base Hadamard matrix of order {k} is invalid")
    return h.to(torch.int8)


@functools.lru_cache(maxsize=8)
def _hadamard_int8(n: int) -> torch.Tensor:
    k, m = factor_size(n)
    return _sylvester(m) if k == 1 else torch.kron(_base_matrix(k), _sylvester(m))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix H_n = kron(H_K, H_{2^k}) with H H^T = n I (a fresh copy)."""
    return _hadamard_int8(n).to(dtype, copy=True)


# ---------------------------------------------------------------- fast transform


@functools.lru_cache(maxsize=64)
def _factors(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Dense ±1 factors whose Kronecker product is H_n, outermost first.

    Sylvester H_{2^(i+j)} = kron(H_{2^i}, H_{2^j}), so the 2^k part splits into balanced
    chunks of at most 2^_SYLVESTER_CHUNK_BITS.  For fp16 each factor is normalised so
    intermediates cannot overflow (65504); elsewhere ±1 keeps integer inputs exact.
    """
    k, m = factor_size(n)
    bits = m.bit_length() - 1
    chunks = -(-bits // _SYLVESTER_CHUNK_BITS)
    mats = [_base_matrix(k)] if k > 1 else []
    mats += [_sylvester(1 << (bits // chunks + (i < bits % chunks))) for i in range(chunks)]
    norm = dtype == torch.float16
    return tuple((h.to(torch.float64) / (math.sqrt(h.shape[0]) if norm else 1.0)).to(dtype=dtype, device=device)
                 for h in mats)


@functools.lru_cache(maxsize=1)
def _fht_module():
    try:  # optional CUDA kernel; absent on CPU-only installs
        import fast_hadamard_transform
    except Exception:
        return None
    return fast_hadamard_transform


def _fht_for(x: torch.Tensor):
    """The fast_hadamard_transform module if it can serve x (CUDA tensor), else None."""
    return _fht_module() if x.is_cuda else None


def hadamard_transform(x: torch.Tensor, scale: float | None = None, fp32: bool = False) -> torch.Tensor:
    """y = x @ H_n^T * scale over the last dim (n = x.shape[-1]); scale defaults to 1/sqrt(n).

    H_n is hadamard_matrix(n); with the default scale the map is orthogonal.  No n x n matrix
    is built: x is viewed as [..., K, f1, f2, ...] and each small factor is applied along
    its axis.  Computes in x.dtype; with fp32=True, fp16/bf16 inputs are computed in float32
    and cast back.  On CUDA, uses fast_hadamard_transform for the 2^k part when installed.
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    k, m = factor_size(n)
    scale = 1.0 / math.sqrt(n) if scale is None else float(scale)
    out_dtype = x.dtype
    if fp32 and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()

    fht = _fht_for(x)
    if fht is not None and 8 <= m <= _FHT_MAX and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        if k == 1:
            y = fht.hadamard_transform(x.contiguous(), scale)
        else:
            # Normalise the 2^k part inside the kernel (keeps fp16 in range), then H_K densely.
            y = fht.hadamard_transform(x.reshape(*x.shape[:-1], k, m).contiguous(), 1.0 / math.sqrt(m))
            h_k = _base_matrix(k).to(dtype=x.dtype, device=x.device)
            y = torch.einsum("...jm,ij->...im", y, h_k).reshape(x.shape) * (scale * math.sqrt(m))
        return y.to(out_dtype)

    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    rows = y.shape[0]
    # Apply the last axis' factor, then rotate that axis to the front; after one pass over
    # all factors the axes are back in order and every factor hit its own axis.
    for h in reversed(_factors(n, x.dtype, x.device)):
        f = h.shape[0]
        y = (y.reshape(-1, f) @ h.T).reshape(rows, n // f, f).transpose(1, 2)
    y = y.reshape(*lead, n)
    ratio = scale * math.sqrt(n) if x.dtype == torch.float16 else scale
    if ratio != 1.0:
        y = y * ratio
    return y.to(out_dtype)


# ---------------------------------------------------------------- random rotations


def _generator(generator_or_seed: torch.Generator | int | None) -> torch.Generator | None:
    if isinstance(generator_or_seed, int) and not isinstance(generator_or_seed, bool):
        return torch.Generator().manual_seed(generator_or_seed)
    if generator_or_seed is None or isinstance(generator_or_seed, torch.Generator):
        return generator_or_seed
    raise TypeError(f"expected a torch.Generator, an int seed or None, got {type(generator_or_seed).__name__}")


def random_signs(n: int, generator_or_seed: torch.Generator | int | None = None) -> torch.Tensor:
    """The ±1 int64 vector s used by random_hadamard_matrix: randint(0, 2, (n,)) * 2 - 1.

    An int seeds a fresh CPU generator; None draws from torch's global RNG.
    """
    gen = _generator(generator_or_seed)
    device = gen.device if gen is not None else "cpu"
    return torch.randint(0, 2, (n,), generator=gen, device=device) * 2 - 1


def random_hadamard_matrix(
    n: int,
    generator_or_seed: torch.Generator | int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random orthogonal Q = diag(s) @ H_n^T / sqrt(n), s = random_signs(n, generator_or_seed).

    Defined so that for row vectors x:  x @ Q == hadamard_transform(x * s).
    """
    factor_size(n)  # fail on unsupported n before consuming random numbers
    s = random_signs(n, generator_or_seed).to(torch.float64).cpu()
    q = hadamard_matrix(n).T * s[:, None] / math.sqrt(n)
    return q.to(dtype=dtype, device=device)
