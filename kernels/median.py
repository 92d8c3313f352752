"""ResFed's median codebook quantiser (Song et al., "ResFed: Communication Efficient Federated
Learning with Deep Compressed Residuals", arXiv 2212.05602; our reading of rruisong/ResFed).

Given the top-k survivors ``v`` (float32):

1. cut: drop every survivor whose ``|v|`` is below the lower median of the non-zero ``|v|``
   (zeros are always dropped);
2. per sign, split the kept values at their lower median (``<= median`` left, ``> median``
   right) ``q - 1`` times, giving ``2**(q-1)`` cells; each cell is represented by its own lower
   median. At ``q = 1`` this is ternary: {negative median, 0 (dropped), positive median}.

Symbols are ``q`` bits: ``sign * 2**(q-1) + cell`` (sign 1 = positive), cells numbered from the
smallest value up. The codebook has ``2**q`` float32 levels; empty cells hold 0.0.
"Lower median" of m sorted values is element ``(m - 1) // 2`` (torch.median's choice), so every
level is one of the inputs.
"""

from __future__ import annotations

import numpy as np
from hpcfed.kernels._checks import check_1d, check_int
from hpcfed.kernels._numba import jit
from hpcfed.kernels.quantize import _check_finite


@jit
def _upper_bound(a, lo, hi, v):
    """First index in [lo, hi) of sorted ``a`` whose value exceeds ``v``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _cells(sorted_vals, depth):
    """Split a sorted array ``depth`` times at lower medians.

    Returns (levels, splits): levels[c] is cell c's lower median (0 if empty); splits are the
    medians at each tree node in heap order (node 1 is the root), used to assign symbols.
    """
    ncell = 1 << depth
    lo = np.zeros(ncell, np.int64)
    hi = np.zeros(ncell, np.int64)
    hi[0] = sorted_vals.size
    splits = np.zeros(ncell, np.float32)
    width = 1
    for _ in range(depth):
        nlo = np.zeros(ncell, np.int64)
        nhi = np.zeros(ncell, np.int64)
        for c in range(width):
            a, b = lo[c], hi[c]
            med = sorted_vals[a + (b - a - 1) // 2] if b > a else np.float32(0.0)
            splits[width + c] = med
            j = _upper_bound(sorted_vals, a, b, med)
            nlo[2 * c], nhi[2 * c] = a, j
            nlo[2 * c + 1], nhi[2 * c + 1] = j, b
        lo, hi = nlo, nhi
        width *= 2
    levels = np.zeros(ncell, np.float32)
    for c in range(ncell):
        if hi[c] > lo[c]:
            levels[c] = sorted_vals[lo[c] + (hi[c] - lo[c] - 1) // 2]
    return levels, splits


@jit
def _assign(v, keep, spl_neg, spl_pos, depth):
    """Symbol of each kept value: sign * 2**depth + its cell, found by descending the split tree."""
    half = 1 << depth
    symbols = np.zeros(v.size, np.uint8)
    for i in range(v.size):
        if keep[i]:
            pos = v[i] > 0
            spl = spl_pos if pos else spl_neg
            node = 1
            for _ in range(depth):
                node = 2 * node + (1 if v[i] > spl[node] else 0)
            symbols[i] = np.uint8(node - half + (half if pos else 0))
    return symbols


def quantize_median(v: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ResFed median quantisation of float32 ``v`` with ``q`` bits (1..8).

    Returns ``(keep, symbols, codebook)``: ``keep`` (bool) marks the survivors of the median cut,
    ``symbols`` (uint8, meaningful where ``keep``; 0 elsewhere) index ``codebook`` (float32,
    ``2**q`` levels, negatives first). Dequantise with ``codebook[symbols[keep]]``.
    """
    v = check_1d(v, np.float32, "v")
    q = check_int(q, "q", 1, 8)
    _check_finite(v, "quantize_median")
    depth = q - 1
    codebook = np.zeros(2 << depth, np.float32)
    mags = np.abs(v[v != 0])
    if mags.size == 0:
        return np.zeros(v.size, bool), np.zeros(v.size, np.uint8), codebook
    # sorting stays in NumPy (C, and compiling np.sort under Numba costs seconds per process)
    cut = np.partition(mags, (mags.size - 1) // 2)[(mags.size - 1) // 2]
    keep = (v != 0) & (np.abs(v) >= cut)
    kept = v[keep]
    lev_n, spl_n = _cells(np.sort(kept[kept < 0]), depth)
    lev_p, spl_p = _cells(np.sort(kept[kept > 0]), depth)
    codebook[: 1 << depth] = lev_n
    codebook[1 << depth :] = lev_p
    return keep, _assign(v, keep, spl_n, spl_p, depth), codebook
