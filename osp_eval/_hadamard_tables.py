"""Stored data for osp_eval.hadamard.

WILLIAMSON_FIRST_ROWS[n] holds the first rows of four symmetric circulant ±1 matrices
A, B, C, D of odd order n with A^2 + B^2 + C^2 + D^2 = 4n I (Williamson matrices).
They are the output of our own computer search, benchmarks/search_williamson.py:
  n=39: `python benchmarks/search_williamson.py 39` (about 2 min on one core);
  n=43: `python benchmarks/search_williamson.py 43 --only 3 --part 0/3` (row sums
        -1, -5, -5, 11; the 15 slices `--only 0..4 --part 0..2/3` ran as parallel
        processes in about 4 min on 16 cores, and decompositions 3 and 4 both had solutions).
hadamard.py re-verifies each matrix (H H^T = 4n I) when it is first built.
"""

WILLIAMSON_FIRST_ROWS: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {
    39: (
        [1, -1, 1, 1, -1, -1, -1, -1, -1, -1, 1, 1, -1, -1, 1, -1, 1, -1, 1, 1, 1, 1, -1, 1, -1, 1, -1, -1, 1, 1, -1, -1, -1, -1, -1, -1, 1, 1, -1],
        [1, 1, -1, -1, 1, 1, 1, -1, 1, -1, -1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, -1, 1, 1, -1, -1, 1, -1, 1, 1, 1, -1, -1, 1],
        [1, -1, -1, -1, 1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, 1, -1, -1, -1],
        [1, -1, -1, -1, 1, -1, -1, -1, 1, -1, 1, 1, -1, 1, 1, -1, -1, -1, -1, 1, 1, -1, -1, -1, -1, 1, 1, -1, 1, 1, -1, 1, -1, -1, -1, 1, -1, -1, -1],
    ),
    43: (
        [1, 1, -1, -1, -1, 1, -1, 1, -1, -1, 1, 1, -1, -1, 1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, 1, -1, -1, 1, 1, -1, -1, 1, -1, 1, -1, -1, -1, 1],
        [1, -1, -1, -1, -1, -1, -1, 1, 1, -1, 1, -1, -1, -1, 1, 1, 1, 1, -1, 1, 1, -1, -1, 1, 1, -1, 1, 1, 1, 1, -1, -1, -1, 1, -1, 1, 1, -1, -1, -1, -1, -1, -1],
        [1, -1, -1, -1, -1, 1, 1, 1, 1, -1, 1, -1, -1, 1, -1, -1, 1, -1, 1, -1, -1, 1, 1, -1, -1, 1, -1, 1, -1, -1, 1, -1, -1, 1, -1, 1, 1, 1, 1, -1, -1, -1, -1],
        [1, -1, 1, 1, 1, 1, -1, -1, 1, 1, -1, -1, 1, -1, 1, -1, 1, -1, 1, 1, 1, 1, 1, 1, 1, 1, -1, 1, -1, 1, -1, 1, -1, -1, 1, 1, -1, -1, 1, 1, 1, 1, -1],
    ),
}
