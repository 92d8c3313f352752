"""Slow, obviously-correct NumPy/Python references for every kernel: the oracle of the tests.

Each function states the rule the kernel must follow, written the plainest way (sorting,
recursion, bit strings), with no attempt at speed.
"""

from __future__ import annotations

import numpy as np

M64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """Steele, Lea and Flood's splitmix64 finaliser (OOPSLA 2014) on Python ints."""
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def topk_abs(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort by |x| descending, ties by index ascending; keep k; return indices ascending."""
    if not np.isfinite(x).all():
        raise ValueError("NaN or Inf")
    order = np.lexsort((np.arange(x.size), -np.abs(x.astype(np.float64))))
    idx = np.sort(order[:k]).astype(np.int64)
    return idx, x[idx]


def quantize_uniform(x, bits, scale, stochastic=False, seed=0) -> np.ndarray:
    top = (1 << bits) - 1
    if scale == 0:
        return np.zeros(x.size, np.uint8)
    s = np.float32(scale)
    with np.errstate(over="ignore"):
        inv = np.float32(top / (2.0 * scale))
    if not np.isfinite(inv):  # a scale below float32's normal range: every symbol 0
        return np.zeros(x.size, np.uint8)
    t = (x.astype(np.float32) + s) * inv
    if stochastic:
        key = splitmix64(seed)
        u = np.array(
            [np.float32(splitmix64(key ^ i) >> 40) * np.float32(1.0 / 16777216.0) for i in range(x.size)],
            np.float32,
        )
        q = np.floor(t + u)
    else:
        q = np.floor(t + np.float32(0.5))
    return np.clip(q, 0, top).astype(np.uint8)


def dequantize_uniform(q, bits, scale) -> np.ndarray:
    top = (1 << bits) - 1
    if scale == 0:
        return np.zeros(q.size, np.float32)
    return q.astype(np.float32) * np.float32(2.0 * scale / top) - np.float32(scale)


def quantize_sign(x) -> np.ndarray:
    return (x >= 0).astype(np.uint8)


def dequantize_sign(q, scale) -> np.ndarray:
    return np.where(q == 1, np.float32(scale), np.float32(-scale)).astype(np.float32)


def _lower_median(v):
    return np.sort(v)[(v.size - 1) // 2]


def _median_cells(v, depth):
    """ResFed's recursion: split at the lower median (<= left, > right) depth times; leaves listed
    from the smallest values up, each as (its lower median or 0.0 if empty, the values)."""
    if depth == 0:
        return [(np.float32(_lower_median(v)) if v.size else np.float32(0.0), v)]
    med = _lower_median(v) if v.size else np.float32(0.0)
    return _median_cells(v[v <= med], depth - 1) + _median_cells(v[v > med], depth - 1)


def quantize_median(v, q):
    nz = np.abs(v[v != 0])
    keep = np.zeros(v.size, bool)
    symbols = np.zeros(v.size, np.uint8)
    codebook = np.zeros(2 << (q - 1), np.float32)
    if nz.size == 0:
        return keep, symbols, codebook
    cut = _lower_median(nz)
    keep = (v != 0) & (np.abs(v) >= cut)
    half = 1 << (q - 1)
    for sign, offset in ((-1, 0), (1, half)):
        sel = keep & ((v > 0) if sign > 0 else (v < 0))
        cells = _median_cells(v[sel], q - 1)
        for c, (level, members) in enumerate(cells):
            codebook[offset + c] = level
            symbols[sel & np.isin(v, members)] = offset + c
    return keep, symbols, codebook


def pack_bits(q, bits) -> np.ndarray:
    stream = [(int(s) >> b) & 1 for s in q for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return np.array([sum(stream[i + b] << b for b in range(8)) for i in range(0, len(stream), 8)], np.uint8)


def gaps(idx) -> np.ndarray:
    return np.diff(np.concatenate([[-1], idx])).astype(np.uint64) - np.uint64(1)


def rice_encode(g, r) -> np.ndarray:
    stream = []
    for v in g:
        v = int(v)
        stream += [1] * (v >> r) + [0] + [(v >> b) & 1 for b in range(r)]
    stream += [0] * (-len(stream) % 8)
    return np.array([sum(stream[i + b] << b for b in range(8)) for i in range(0, len(stream), 8)], np.uint8)


def quantize_pack_uniform(x, bits, scale, stochastic=False, seed=0) -> np.ndarray:
    """The fused kernel's rule: the uniform symbols, then the LSB-first bit stream."""
    return pack_bits(quantize_uniform(x, bits, scale, stochastic, seed), bits)


def packed_counts(data, bits, n) -> np.ndarray:
    """How often each symbol occurs among the first ``n`` ``bits``-bit fields of the bit stream."""
    stream = [(int(b) >> i) & 1 for b in data for i in range(8)]
    symbols = [sum(stream[j * bits + i] << i for i in range(bits)) for j in range(n)]
    return np.bincount(np.array(symbols, np.int64), minlength=1 << bits).astype(np.int64)
