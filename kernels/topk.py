"""Exact top-k by magnitude: ``topk_abs(x, k) -> (indices, values)``.

The fast path follows Deep Gradient Compression (Lin et al., ICLR 2018, "Deep Gradient
Compression", section 3 / their sampled top-k): estimate the threshold from a small sample,
keep every element above it in one streaming pass, then fix the result up exactly on the few
candidates. Unlike DGC (which accepts an approximate k), the fix-up makes the result exact, and
a rare bad sample (too few or too many candidates) falls back to an exact radix select over the
whole array.

Everything works on integer keys: for IEEE floats, ``bits & 0x7fffffff`` orders exactly like
``|x|``, so comparisons are exact, NaN and Inf are simply keys ``>= 0x7f800000`` (found for free
among the candidates), and integer loops vectorise without fast-math.

Tie rule (documented, followed by ``tests/naive.py``): among equal ``|x|`` (including ``+a`` and
``-a``, ``+0`` and ``-0``) the lower index wins.
"""

from __future__ import annotations

import numpy as np
from hpcfed.kernels._checks import check_1d, check_int
from hpcfed.kernels._numba import jit

_ABS_MASK = np.uint32(0x7FFFFFFF)
_NONFINITE = np.uint32(0x7F800000)  # keys at or above this are Inf or NaN
_SAMPLE = 1 << 15  # sample size for the threshold estimate
_MIN_FAST_N = 1 << 15  # below this the exact radix select is already cheap


@jit
def _splitmix64(z):
    # Steele et al., "Fast splittable pseudorandom number generators" (OOPSLA 2014)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@jit
def _select_kth_key(bits, idx, use_idx, k):
    """The k-th largest key among ``bits[idx]`` (or all of ``bits``), and how many keys exceed it.

    Radix select, most significant digit first (11, 10, 10 bits of the 31-bit key): each pass is a
    histogram over the keys that still share the chosen prefix. Exact, O(n) per pass.
    Returns (key, count_greater, any_nonfinite).
    """
    m = idx.size if use_idx else bits.size
    prefix = np.uint32(0)
    prefix_mask = np.uint32(0)
    greater = 0  # keys known to be above the current prefix
    need = k
    nonfinite = False
    for shift, width in ((20, 11), (10, 10), (0, 10)):
        hist = np.zeros(1 << width, np.int64)
        dmask = np.uint32((1 << width) - 1)
        for j in range(m):
            i = idx[j] if use_idx else j
            key = bits[i] & _ABS_MASK
            if shift == 20 and key >= _NONFINITE:
                nonfinite = True
            if (key & prefix_mask) == prefix:
                hist[(key >> np.uint32(shift)) & dmask] += 1
        d = (1 << width) - 1
        while d > 0 and hist[d] < need:
            need -= hist[d]
            greater += hist[d]
            d -= 1
        prefix = prefix | (np.uint32(d) << np.uint32(shift))
        prefix_mask = prefix_mask | (dmask << np.uint32(shift))
    return prefix, greater, nonfinite


@jit
def _collect(bits, idx, use_idx, key_t, take_equal, k):
    """Indices (ascending) of keys > key_t plus the first ``take_equal`` keys == key_t."""
    out = np.empty(k, np.int64)
    c = 0
    m = idx.size if use_idx else bits.size
    for j in range(m):
        i = idx[j] if use_idx else j
        key = bits[i] & _ABS_MASK
        if key > key_t:
            out[c] = i
            c += 1
        elif key == key_t and take_equal > 0:
            out[c] = i
            c += 1
            take_equal -= 1
    return out


@jit
def _sample_threshold(bits, k):
    """A key that about k·(1 + margin) elements reach, from a hashed sample (DGC-style)."""
    n = bits.size
    sample = np.empty(_SAMPLE, np.uint32)
    for j in range(_SAMPLE):
        sample[j] = bits[_splitmix64(np.uint64(j)) % np.uint64(n)]
    # expected hits in the sample plus ~4 standard deviations: too few candidates is rare
    mean = _SAMPLE * (k / n)
    r = int(mean + 4.0 * np.sqrt(mean) + 8.0)
    if r >= _SAMPLE:
        return np.uint32(0), False
    no_idx = np.empty(0, np.int64)
    key, _, nonfinite = _select_kth_key(sample, no_idx, False, r)
    return key, not nonfinite


@jit
def _filter(bits, thr, cap):
    """One streaming pass: positions and keys of keys >= thr (at most ``cap``), and their count.

    A plain predictable branch (taken ~1% of the time) measured as fast as blocked or
    branch-free variants here; the pass is memory-bound.
    """
    out = np.empty(cap, np.int64)
    keys = np.empty(cap, np.uint32)
    c = 0
    for i in range(bits.size):
        key = bits[i] & _ABS_MASK
        if key >= thr:
            if c < cap:
                out[c] = i
                keys[c] = key
            c += 1
    return out, keys, c


@jit
def _topk_keys(bits, k):
    """Exact top-k indices of the keys; second result is True if any key is non-finite."""
    n = bits.size
    no_idx = np.empty(0, np.int64)
    if n >= _MIN_FAST_N and k * 16 <= n:
        thr, ok = _sample_threshold(bits, k)
        if ok:
            cap = 2 * int(k * 1.5 + 1024)
            cand, keys, c = _filter(bits, thr, cap)
            if k <= c <= cap:
                # select and collect on the compact candidate keys, then map back to positions
                keys = keys[:c]
                key_t, greater, nonfinite = _select_kth_key(keys, no_idx, False, k)
                if nonfinite:
                    return no_idx, True
                pos = _collect(keys, no_idx, False, key_t, k - greater, k)
                return cand[pos], False
    key_t, greater, nonfinite = _select_kth_key(bits, no_idx, False, k)
    if nonfinite:
        return no_idx, True
    return _collect(bits, no_idx, False, key_t, k - greater, k), False


@jit
def _any_nonfinite(bits):
    bad = False
    for i in range(bits.size):
        bad |= (bits[i] & _ABS_MASK) >= _NONFINITE
    return bad


def topk_abs(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` entries of largest ``|x|``: (indices int64 ascending, values ``x[indices]``).

    ``x`` is a 1-D C-contiguous float32 array; ``0 <= k <= x.size``. Ties in ``|x|`` go to the
    lower index. NaN or Inf anywhere in ``x`` raises ``ValueError``. Single-threaded, so the
    result does not depend on the thread count.
    """
    x = check_1d(x, np.float32)
    k = check_int(k, "k", 0, x.size)
    bits = x.view(np.uint32)
    if k == 0 or k == x.size:
        if _any_nonfinite(bits):
            raise ValueError("topk_abs: x contains NaN or Inf")
        idx = np.arange(k, dtype=np.int64)
    else:
        idx, bad = _topk_keys(bits, k)
        if bad:
            raise ValueError("topk_abs: x contains NaN or Inf")
    return idx, x[idx]
