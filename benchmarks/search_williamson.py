"""Computer search for Williamson matrices of odd order n (used for H_156, H_172).

Williamson matrices are four symmetric circulant ±1 matrices A, B, C, D of order n
with A^2 + B^2 + C^2 + D^2 = 4n I.  Plugged into the Williamson array they give a
Hadamard matrix of order 4n.  This script finds one quadruple by a meet-in-the-middle
search and prints the first rows; `osp_eval/_hadamard_tables.py` stores its output.

Usage:  python benchmarks/search_williamson.py 39 43 [--only I] [--part i/P]

Search outline (all standard facts, verified exactly at the end):
  * Negating a matrix keeps its square, so every first entry is +1.  A symmetric
    sequence is then fixed by its entries 1..m (m = (n-1)/2): 2^m candidates.
  * Each sequence must have power spectral density PSD(k) = |DFT(k)|^2 <= 4n at every
    frequency (the four PSDs sum to 4n), which removes ~80% of them.
  * Row sums satisfy a^2 + b^2 + c^2 + d^2 = 4n; each decomposition is searched.
  * With first entries +1, a_j b_j c_j d_j = -1 for j >= 1 (Williamson's lemma; we also
    checked it by brute force for n <= 11).  As bitmasks: u_a ^ u_b ^ u_c ^ u_d = all ones.
  * A^2+B^2+C^2+D^2 = 4n I  <=>  the periodic autocorrelations sum to 0 at every
    nonzero shift.  Pairs (A, B) and (C, D) are matched on a hash of that integer
    vector plus the xor mask.  The multiplier group j -> k j (k a unit mod n) maps
    solutions to solutions, so A is taken canonical (minimal in its orbit).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


def symmetric_sequences(n: int) -> dict[str, np.ndarray]:
    """All symmetric ±1 sequences of odd length n with a_0 = +1 passing the PSD test."""
    m = (n - 1) // 2
    u = np.arange(1 << m, dtype=np.int64)  # bit j-1 set <=> a_j = -1
    half = 1 - 2 * ((u[:, None] >> np.arange(m)) & 1).astype(np.float32)
    freqs = np.arange(m + 1)  # PSD is symmetric in k, so 0..m suffices
    cos = 2 * np.cos(2 * np.pi * np.outer(np.arange(1, m + 1), freqs) / n).astype(np.float32)
    dft = 1 + half @ cos
    psd = dft * dft
    ok = (psd <= 4 * n + 1e-3).all(1)
    u, half, psd, rowsum = u[ok], half[ok].astype(np.int8), psd[ok], np.rint(dft[ok, 0]).astype(np.int64)
    seq = np.concatenate([np.ones((len(u), 1), np.int8), half, half[:, ::-1]], axis=1)
    # Periodic autocorrelation at shifts 1..m (symmetric beyond m).
    paf = np.stack([(seq.astype(np.int64) * np.roll(seq, -s, axis=1)).sum(1) for s in range(1, m + 1)], 1)
    # Canonical under the multiplier group: a'_j = a_{k j mod n}.
    canon = np.ones(len(u), bool)
    for k in range(2, n):
        if np.gcd(k, n) != 1:
            continue
        src = (k * np.arange(1, m + 1)) % n
        src = np.minimum(src, n - src)  # index into 1..m by symmetry
        uk = (((u[:, None] >> (src - 1)) & 1) << np.arange(m)).sum(1)
        canon &= u <= uk
    return {"u": u, "seq": seq, "psd": psd, "rowsum": rowsum, "paf": paf, "canon": canon}


def decompositions(n: int, rowsums: set[int]) -> list[tuple[int, int, int, int]]:
    """Multisets of attainable row sums whose squares add to 4n."""
    vals = sorted(rowsums, key=abs)
    return [q for q in itertools.combinations_with_replacement(vals, 4) if sum(r * r for r in q) == 4 * n]


def williamson_array(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    circ = lambda v: np.stack([np.roll(v, i) for i in range(len(v))])  # noqa: E731
    A, B, C, D = (circ(v.astype(np.int64)) for v in (a, b, c, d))
    return np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])


def _keys(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return h ^ (mask.astype(np.uint64) * _MIX)


def search(n: int, only: int | None = None, part: tuple[int, int] = (0, 1),
           chunk: int = 32) -> tuple[np.ndarray, ...] | None:
    """Search every row-sum decomposition (or only the `only`-th one), streaming the
    `part[0]`-th of `part[1]` slices of C: slices can run as parallel processes."""
    t0 = time.time()
    S = symmetric_sequences(n)
    m = (n - 1) // 2
    full = (1 << m) - 1
    w = np.random.default_rng(1234).integers(0, 2**63, size=m, dtype=np.uint64) | np.uint64(1)
    h = (S["paf"].astype(np.uint64) * w).sum(1)  # linear hash of the autocorrelation
    rows = {r: np.flatnonzero(S["rowsum"] == r) for r in set(S["rowsum"].tolist())}
    print(f"n={n}: {len(S['u'])} sequences pass PSD ({time.time() - t0:.1f}s)", flush=True)
    decomps = decompositions(n, set(rows))
    print(f"  row-sum decompositions: {decomps}", flush=True)
    for q in decomps if only is None else decomps[only : only + 1]:
        # Choose the 2+2 split whose streamed side (C, D) is smallest.
        splits = {(q[0], q[i], *[q[j] for j in range(1, 4) if j != i]) for i in range(1, 4)}
        ra, rb, rc, rd = min(splits, key=lambda s: len(rows[s[2]]) * len(rows[s[3]]))
        ia = rows[ra][S["canon"][rows[ra]]]
        ib, ic, id_ = rows[rb], rows[rc], rows[rd]
        # Side 1: (A canonical, B) pairs passing the pair PSD bound, keyed and sorted.
        keys1, pairs1 = [], []
        for s in range(0, len(ia), chunk):
            a = ia[s : s + chunk]
            ok = (S["psd"][a][:, None, :] + S["psd"][ib][None, :, :] <= 4 * n + 1e-3).all(-1)
            x, y = np.nonzero(ok)
            x, y = a[x], ib[y]
            keys1.append(_keys(h[x] + h[y], full ^ (S["u"][x] ^ S["u"][y])))
            pairs1.append(np.stack([x, y], 1))
        keys1, pairs1 = np.concatenate(keys1), np.concatenate(pairs1)
        order = np.argsort(keys1)
        keys1, pairs1 = keys1[order], pairs1[order]
        print(f"  rowsums {(ra, rb, rc, rd)}: {len(keys1)} (A,B) pairs; streaming "
              f"{len(ic)}x{len(id_)} (C,D) ({time.time() - t0:.1f}s)", flush=True)
        # Side 2: stream (C, D) pairs and look them up.
        psd_d = S["psd"][id_]
        ic = np.array_split(ic, part[1])[part[0]]
        for s in range(0, len(ic), chunk):
            if s % (chunk * 256) == 0:
                print(f"    C {s}/{len(ic)} ({time.time() - t0:.1f}s)", flush=True)
            c = ic[s : s + chunk]
            ok = (S["psd"][c][:, None, :] + psd_d[None, :, :] <= 4 * n + 1e-3).all(-1)
            x, y = np.nonzero(ok)
            x, y = c[x], id_[y]
            k2 = _keys(np.uint64(0) - (h[x] + h[y]), S["u"][x] ^ S["u"][y])
            pos = np.searchsorted(keys1, k2)
            pos[pos == len(keys1)] = 0
            for i in np.flatnonzero(keys1[pos] == k2):
                p = pos[i]
                while p < len(keys1) and keys1[p] == k2[i]:
                    quad = (S["seq"][pairs1[p, 0]], S["seq"][pairs1[p, 1]], S["seq"][x[i]], S["seq"][y[i]])
                    H = williamson_array(*quad)
                    if (H @ H.T == 4 * n * np.eye(4 * n, dtype=np.int64)).all():
                        print(f"  found after {time.time() - t0:.1f}s", flush=True)
                        return quad
                    p += 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("orders", type=int, nargs="*", default=[39, 43])
    ap.add_argument("--only", type=int, default=None, help="search only this row-sum decomposition (index)")
    ap.add_argument("--part", default="0/1", help="i/P: stream only slice i of P of the C list")
    args = ap.parse_args()
    part = tuple(int(v) for v in args.part.split("/"))
    for n in args.orders:
        quad = search(n, args.only, part)
        if quad is None:
            print(f"n={n}: no Williamson matrices found")
            continue
        print(f"WILLIAMSON_{n} = (")
        for v in quad:
            print(f"    {v.astype(int).tolist()},")
        print(")")


if __name__ == "__main__":
    main()
