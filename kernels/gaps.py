"""Gap (delta) coding of sorted indices and Golomb–Rice coding of the gaps.

Top-k positions are strictly increasing; their gaps ``g[0] = i[0]``, ``g[j] = i[j] - i[j-1] - 1``
are small, roughly geometric numbers (about n/k at sparsity s = 1 - k/n). A Rice code with
parameter r writes ``g >> r`` in unary then the ``r`` low bits (Golomb, IEEE Trans. IT 1966; Rice,
JPL 1979); for geometric gaps with the best r it is within a few percent of their entropy and
needs no table, which is why ResFed-style position streams are coded this way here.

Bit stream: LSB first within bytes; unary as ``q`` one-bits then a zero-bit.
The decoder checks every read against the end of the data and returns a status instead of
reading out of bounds (Numba does not bounds-check), so corrupt input cannot crash.
"""

from __future__ import annotations

import numpy as np
from hpcfed.kernels._checks import check_1d, check_int
from hpcfed.kernels._numba import jit


@jit
def _gaps(idx, n):
    g = np.empty(idx.size, np.uint64)
    prev = -1
    for j in range(idx.size):
        d = idx[j] - prev - 1
        if d < 0 or idx[j] >= n:
            return g, False
        g[j] = np.uint64(d)
        prev = idx[j]
    return g, True


def gaps_encode(indices: np.ndarray, n: int) -> np.ndarray:
    """uint64 gaps of strictly increasing int64 ``indices`` in ``[0, n)``."""
    indices = check_1d(indices, np.int64, "indices")
    n = check_int(n, "n", 0, 2**62)
    g, ok = _gaps(indices, n)
    if not ok:
        raise ValueError("gaps_encode: indices must be strictly increasing and in [0, n)")
    return g


@jit
def _ungaps(g, n):
    idx = np.empty(g.size, np.int64)
    pos = np.int64(-1)
    lim = np.uint64(n)
    for j in range(g.size):
        # compare before adding so a huge corrupt gap cannot overflow
        if g[j] >= lim:
            return idx, False
        pos = pos + 1 + np.int64(g[j])
        if pos >= n:
            return idx, False
        idx[j] = pos
    return idx, True


def gaps_decode(gaps: np.ndarray, n: int) -> np.ndarray:
    """int64 indices from uint64 gaps; ``ValueError`` if they leave ``[0, n)``."""
    gaps = check_1d(gaps, np.uint64, "gaps")
    n = check_int(n, "n", 0, 2**62)
    idx, ok = _ungaps(gaps, n)
    if not ok:
        raise ValueError(f"gaps_decode: gaps run past n = {n}")
    return idx


@jit
def _rice_length(g, r):
    total = 0
    for j in range(g.size):
        total += np.int64(g[j] >> np.uint64(r)) + 1 + r
    return total


@jit
def rice_parameter(g):
    """The Rice parameter (0..62) giving the fewest bits for ``g``: searched around log2(mean·ln2)."""
    if g.size == 0:
        return 0
    mean = 0.0
    for j in range(g.size):
        mean += np.float64(g[j])
    mean /= g.size
    r0 = int(np.log2(max(mean * 0.6931471805599453, 1.0)))
    best_r = 0
    best = -1
    for r in range(max(r0 - 2, 0), min(r0 + 3, 63)):
        length = _rice_length(g, r)
        if best < 0 or length < best:
            best, best_r = length, r
    return best_r


@jit
def _rice_encode(g, r):
    nbits = _rice_length(g, r)
    out = np.zeros((nbits + 7) // 8, np.uint8)
    pos = 0
    low = (np.uint64(1) << np.uint64(r)) - np.uint64(1)
    for j in range(g.size):
        q = np.int64(g[j] >> np.uint64(r))
        for _ in range(q):  # unary: q ones (the zero-bit terminator is already zero)
            out[pos >> 3] |= np.uint8(1 << (pos & 7))
            pos += 1
        pos += 1
        v = g[j] & low
        for b in range(r):
            if (v >> np.uint64(b)) & np.uint64(1):
                out[pos >> 3] |= np.uint8(1 << (pos & 7))
            pos += 1
    return out


def rice_encode(g: np.ndarray, r: int) -> np.ndarray:
    """Rice code of uint64 values ``g`` with parameter ``r`` (0..62) as uint8 bytes."""
    g = check_1d(g, np.uint64, "g")
    r = check_int(r, "r", 0, 62)
    return _rice_encode(g, r)


@jit
def _rice_decode(data, r, count):
    out = np.empty(count, np.uint64)
    nbits = data.size * 8
    pos = 0
    for j in range(count):
        q = np.uint64(0)
        while True:
            if pos >= nbits:
                return out, False
            bit = (data[pos >> 3] >> (pos & 7)) & 1
            pos += 1
            if bit == 0:
                break
            q += np.uint64(1)
        if pos + r > nbits or (r > 0 and q >= (np.uint64(1) << np.uint64(63 - r))):
            return out, False
        v = np.uint64(0)
        for b in range(r):
            if (data[pos >> 3] >> (pos & 7)) & 1:
                v |= np.uint64(1) << np.uint64(b)
            pos += 1
        out[j] = (q << np.uint64(r)) | v
    # everything after the last code must be padding inside the final byte
    if (nbits - pos) >= 8:
        return out, False
    return out, True


def rice_decode(data: np.ndarray, r: int, count: int) -> np.ndarray:
    """``count`` uint64 values from Rice-coded bytes; ``ValueError`` on truncated or excess data."""
    data = check_1d(data, np.uint8, "data")
    r = check_int(r, "r", 0, 62)
    count = check_int(count, "count", 0, 2**62)
    if count > data.size * 8:
        raise ValueError("rice_decode: more values announced than bits present")
    out, ok = _rice_decode(data, r, count)
    if not ok:
        raise ValueError("rice_decode: data truncated or malformed")
    return out
