"""Hadamard matrices and fast Hadamard transforms over the last dimension.

Sizes are n = K * 2^k where some construction below gives a K x K Hadamard matrix H_K
(K = 1 for powers of two).  The matrix is H_n = kron(H_K, H_{2^k}), H_{2^k} Sylvester's.

  construction  order K                            e.g.
  Sylvester     2^k                                2, 4, 8
  Paley I       q + 1,   q = p^m = 3 (mod 4)       12, 20, 44, 60, 68 (q = 67), 84, 108, 140,
                                                   244 (q = 3^5)
  Paley II      2(q + 1), q = p^m = 1 (mod 4)      28 (q = 13), 36, 52 (q = 5^2), 76 (q = 37),
                                                   100 (q = 7^2), 148, 924 (q = 461)
  Williamson    4n, n stored in _hadamard_tables   156, 172: Williamson array from Williamson matrices
                                                   of order 39 / 43, found by benchmarks/search_williamson.py
  Kronecker     a * b (H_a, H_b constructible)     40 = 2 * 20

Paley uses the quadratic character of GF(q), q = p^m: GF(p)[t] / f(t) with f from _irreducible.
benchmarks/hadamard_orders.py lists the construction of every multiple of 4 below 1000.

How n is decomposed (deterministic; a size supported before K became open-ended keeps its
matrix, so results computed with it stay valid):
  1. the first K in K_ORDER (the original fixed list, in its original order) with n / K a power of two;
  2. else K = 1 if n is a power of two;
  3. else the smallest constructible K with n / K a power of two (the largest power-of-two part).
How H_K is built: K in K_ORDER keeps its original construction (for 28 that is Paley II q = 13,
not Paley I q = 27); any other K takes the first that applies of Paley I, Paley II, Williamson,
Kronecker (smallest first factor a, so 2 * K/2 when K/2 is constructible).

Public API: hadamard_matrix, hadamard_transform, random_hadamard_matrix, random_signs,
factor_size, is_supported, constructible, supported_orders, unsupported_message.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from ._hadamard_tables import WILLIAMSON_FIRST_ROWS
from .memo import memo

# The original fixed list of K.  Decomposition tries it first, in this order (the reference
# implementation's), and each keeps its original construction, so its matrices never change.
K_ORDER: tuple[int, ...] = (172, 156, 140, 108, 60, 52, 36, 28, 44, 40, 20, 12)
SUPPORTED_K: tuple[int, ...] = tuple(sorted(K_ORDER))  # that list; any constructible(K) works now
_ORIGINAL: dict[int, tuple] = {
    12: ("paley1", 11), 20: ("paley1", 19), 44: ("paley1", 43), 60: ("paley1", 59),
    108: ("paley1", 107), 140: ("paley1", 139),
    28: ("paley2", 13), 36: ("paley2", 17), 52: ("paley2", 25),
    40: ("kron", 2, 20),
    156: ("williamson", 39), 172: ("williamson", 43),
}

_SYLVESTER_CHUNK_BITS = 7  # dense factors of the 2^k part are at most 128 x 128
_FHT_MAX = 32768  # fast_hadamard_transform's largest supported size


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _is_size(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p^m and p prime, else None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    m = 0
    while q % p == 0:
        q, m = q // p, m + 1
    return (p, m) if q == 1 else None


# ---------------------------------------------------------------- which orders and sizes


@functools.lru_cache(maxsize=None)
def _construction(k: int) -> tuple | None:
    """How H_k is built: ("sylvester",), ("paley1", q), ("paley2", q), ("williamson", n) or
    ("kron", a, b); None if nothing here builds one."""
    if k in _ORIGINAL:
        return _ORIGINAL[k]
    if _is_pow2(k):
        return ("sylvester",)
    if k % 4:  # Hadamard orders other than 1 and 2 are multiples of 4
        return None
    if _prime_power(k - 1):  # q = k - 1 = 3 (mod 4) since 4 | k
        return ("paley1", k - 1)
    if (k // 2 - 1) % 4 == 1 and _prime_power(k // 2 - 1):
        return ("paley2", k // 2 - 1)
    if k // 4 in WILLIAMSON_FIRST_ROWS:
        return ("williamson", k // 4)
    for a in range(2, math.isqrt(k) + 1):
        if k % a == 0 and _construction(a) and _construction(k // a):
            return ("kron", a, k // a)
    return None


def constructible(k: int) -> bool:
    """Whether some construction here gives a k x k Hadamard matrix (memoized)."""
    return _is_size(k) and _construction(k) is not None


def supported_orders(limit: int) -> list[int]:
    """All constructible K <= limit: 1, 2 and multiples of 4."""
    return [k for k in range(1, limit + 1) if constructible(k)]


def _find_k(n: int) -> int | None:
    """K for the positive size n by the rule in the module docstring, or None."""
    for k in K_ORDER:
        if n % k == 0 and _is_pow2(n // k):
            return k
    if _is_pow2(n):
        return 1
    k = n // (n & -n)  # odd part: try odd * 2^j, smallest first
    while k <= n:
        if constructible(k):
            return k
        k *= 2
    return None


def unsupported_message(n: int, what: str | None = None) -> str:
    """One line saying that size n (of `what`) has no construction, with the nearest supported sizes."""
    subject = f"{what} = {n}" if what else f"size {n!r}"
    if not _is_size(n):
        return f"no Hadamard construction for {subject}: size must be a positive int"
    below = next((m for m in range(n - 1, 0, -1) if _find_k(m)), None)
    above = next(m for m in itertools.count(n + 1) if _find_k(m))  # ends by the next power of two
    if n & -n > 1:  # the odd part is what matters: every K would be odd * 2^j
        subject += f" ({n & -n}·{n // (n & -n)})"
    nearest = f"sizes are {below} and {above}" if below else f"size is {above}"
    return f"no Hadamard construction for {subject}: nearest supported {nearest}"


def factor_size(n: int) -> tuple[int, int]:
    """Return (K, m) with n = K * m, m a power of two, K = 1 or constructible (rule: module docstring)."""
    k = _find_k(n) if _is_size(n) else None
    if k is None:
        raise ValueError(unsupported_message(n))
    return k, n // k


def is_supported(n: int) -> bool:
    return _is_size(n) and _find_k(n) is not None


# ---------------------------------------------------------------- GF(q)


def _poly_rem(a: list[int], g: list[int], p: int) -> list[int]:
    """Remainder of a modulo the monic g over GF(p); coefficients lowest first."""
    a, d = list(a), len(g) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        for j in range(d + 1):
            a[i - d + j] = (a[i - d + j] - c * g[j]) % p
    return a[:d]


@functools.lru_cache(maxsize=None)
def _irreducible(p: int, m: int) -> tuple[int, ...]:
    """The modulus f of GF(p^m), monic, coefficients lowest first: the first irreducible among
    t^m - c for c = 1, 2, ..., p - 1, then among all monic f in increasing order of sum f_i p^i.
    For m = 2 this is t^2 - r, r the smallest non-residue: the GF(p^2) used from the start."""
    binomials = ([(-c) % p, *[0] * (m - 1), 1] for c in range(1, p))
    others = ([*reversed(c), 1] for c in itertools.product(range(p), repeat=m))
    for f in itertools.chain(binomials, others):
        # Irreducible iff no monic factor of degree 1 .. m // 2 (f has degree m).
        if all(any(_poly_rem(f, [*g, 1], p)) for d in range(1, m // 2 + 1)
               for g in itertools.product(range(p), repeat=d)):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {m} over GF({p})")


@functools.lru_cache(maxsize=None)
def _field(q: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """GF(q), q = p^m: (p, digits, powers).  Element i is sum_j digits[i, j] t^j modulo
    f = _irreducible(p, m), digits[i] the base-p digits of i, lowest first (for m = 2: i = a + p b
    for a + b t, the original ordering).  powers[j] = digits of t^j mod f, j < 2m - 1."""
    p, m = _prime_power(q)
    f = _irreducible(p, m)
    digits = torch.arange(q)[:, None] // p ** torch.arange(m) % p
    powers, t = [], [1] + [0] * (m - 1)
    for _ in range(2 * m - 1):
        powers.append(t)
        # t * t^j: shift up; the t^m that falls out is -(f_0 + f_1 t + ... + f_{m-1} t^{m-1}).
        t = [(x - t[-1] * c) % p for x, c in zip([0] + t[:-1], f)]
    return p, digits, torch.tensor(powers)


def _gf_index(q: int, digits: torch.Tensor) -> torch.Tensor:
    p, m = _prime_power(q)
    return (digits * p ** torch.arange(m)).sum(-1)


def _gf_mul(q: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise product in GF(q) of element indices a and b (broadcast)."""
    p, digits, powers = _field(q)
    m = digits.shape[1]
    da, db = torch.broadcast_tensors(digits[a], digits[b])
    prod = torch.zeros(*da.shape[:-1], 2 * m - 1, dtype=torch.int64)  # polynomial product
    for i in range(m):
        prod[..., i : i + m] += da[..., i : i + 1] * db
    return _gf_index(q, (prod[..., None] * powers).sum(-2) % p)


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> torch.Tensor:
    """chi[i] = 1 if element i of GF(q) is a nonzero square, -1 if not a square, chi[0] = 0."""
    idx = torch.arange(q)
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[_gf_mul(q, idx, idx)] = 1
    chi[0] = 0
    return chi


# ---------------------------------------------------------------- constructions
# Built as int64 on CPU (exact), checked once, stored as int8.


def _sylvester(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(x_j - x_i) over GF(q), chi the quadratic character."""
    p, digits, _ = _field(q)
    return _quadratic_character(q)[_gf_index(q, (digits[None, :, :] - digits[:, None, :]) % p)]


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
    how = _construction(k) if _is_size(k) else None
    if how is None:
        raise ValueError(f"no base Hadamard matrix of order {k}")
    kind, *args = how
    if kind == "sylvester":
        h = _sylvester(k).long()
    elif kind == "paley1":
        h = _paley_i(*args)
    elif kind == "paley2":
        h = _paley_ii(*args)
    elif kind == "williamson":
        h = _williamson(*args)
    else:
        h = torch.kron(_base_matrix(args[0]), _base_matrix(args[1])).long()
    # Guard against a broken construction or table, once per K (O(K^3)).  float64 is exact here:
    # every partial sum is an integer of size <= K; int64 matmul on CPU is far slower.
    hf = h.double()
    if h.shape != (k, k) or not torch.equal(hf @ hf.T, k * torch.eye(k, dtype=torch.float64)):
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


@memo  # not lru_cache: under torch.compile a traced construction would break the graph at its self-check
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


@memo  # not lru_cache: under torch.compile a traced failing import breaks the graph
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
