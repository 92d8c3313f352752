"""Scalar quantisers: uniform b-bit with a scale, ResFed's median codebook, sign + scale.

Uniform (as in QSGD, Alistarh et al., NeurIPS 2017, with a max-norm scale): ``L = 2**bits`` levels
evenly spaced on ``[-scale, scale]``, level ``j`` is ``j * step - scale`` with
``step = 2 * scale / (L - 1)``. There is no zero level (L is even), which costs nothing for
top-k survivors and makes 1 bit the sign. Symbols are ``uint8`` in ``[0, L)``.

- deterministic: round to nearest, ``floor(t + 0.5)`` with ``t = (x + scale) / step``; error at
  most ``step / 2`` for ``|x| <= scale``;
- stochastic: ``floor(t + u)`` with ``u`` uniform on [0, 1) drawn from a counter-based generator
  (splitmix64 of ``(seed, index)``), so ``E[dequantised] = x`` and the result does not depend on
  thread count or call order; error below ``step``.

All arithmetic is float32 in a fixed order, so ``tests/naive.py`` reproduces it bit for bit.
"""

from __future__ import annotations

import numpy as np
from hpcfed.kernels._checks import check_1d, check_int
from hpcfed.kernels._numba import jit
from hpcfed.kernels.topk import _splitmix64

_ABS_MASK = np.uint32(0x7FFFFFFF)
_NONFINITE = np.uint32(0x7F800000)


@jit
def _any_nonfinite_f32(x):
    bits = x.view(np.uint32)
    bad = False
    for i in range(bits.size):
        bad |= (bits[i] & _ABS_MASK) >= _NONFINITE
    return bad


def _check_finite(x: np.ndarray, who: str) -> None:
    if _any_nonfinite_f32(x):
        raise ValueError(f"{who}: x contains NaN or Inf")


@jit
def _absmax(x):
    bits = x.view(np.uint32)
    top = np.uint32(0)
    for i in range(bits.size):
        v = bits[i] & _ABS_MASK
        top = v if v > top else top
    return top


def absmax(x: np.ndarray) -> float:
    """``max |x|`` of a float32 array (0 for an empty one); NaN/Inf raise ``ValueError``."""
    x = check_1d(x, np.float32)
    top = _absmax(x)
    if top >= _NONFINITE:
        raise ValueError("absmax: x contains NaN or Inf")
    return float(np.array([top], np.uint32).view(np.float32)[0])


@jit
def _mean_abs(x):
    # eight independent float64 accumulators: exact order (no fast-math) yet not one long chain
    acc = np.zeros(8, np.float64)
    n8 = x.size // 8 * 8
    for i in range(0, n8, 8):
        for j in range(8):
            acc[j] += abs(np.float64(x[i + j]))
    tail = 0.0
    for i in range(n8, x.size):
        tail += abs(np.float64(x[i]))
    return (acc.sum() + tail) / max(x.size, 1)


def mean_abs(x: np.ndarray) -> float:
    """``mean |x|`` accumulated in float64 (0 for an empty array); the sign quantiser's scale."""
    x = check_1d(x, np.float32)
    _check_finite(x, "mean_abs")
    return float(_mean_abs(x))


def _uniform_params(bits: int, scale: float) -> tuple[np.float32, np.float32, np.float32]:
    levels = (1 << bits) - 1
    if scale == 0.0:
        return np.float32(0.0), np.float32(0.0), np.float32(0.0)
    with np.errstate(over="ignore"):
        inv = np.float32(levels / (2.0 * scale))
    if not np.isfinite(inv):
        # a scale below float32's normal range (~1e-38): the inverse step overflows, and
        # (x + scale) * inf would be NaN; every symbol is 0 instead (decoding to -scale, ~0)
        inv = np.float32(0.0)
    return np.float32(scale), inv, np.float32(2.0 * scale / levels)


@jit
def _quantize_nearest(x, top, scale, inv_step):
    out = np.empty(x.size, np.uint8)
    ftop = np.float32(top)
    for i in range(x.size):
        # clamp then truncate == floor then clamp (0 and top are integers, floor is monotone),
        # and truncation vectorises where a floor call does not
        t = (x[i] + scale) * inv_step + np.float32(0.5)
        out[i] = np.uint8(np.int32(min(max(t, np.float32(0.0)), ftop)))
    return out


@jit
def _quantize_stochastic(x, top, scale, inv_step, seed):
    out = np.empty(x.size, np.uint8)
    ftop = np.float32(top)
    key = _splitmix64(np.uint64(seed))
    for i in range(x.size):
        # top 24 bits of a counter hash -> exactly representable float32 in [0, 1)
        h = _splitmix64(key ^ np.uint64(i))
        u = np.float32(h >> np.uint64(40)) * np.float32(1.0 / 16777216.0)
        t = (x[i] + scale) * inv_step + u
        out[i] = np.uint8(np.int32(min(max(t, np.float32(0.0)), ftop)))
    return out


def quantize_uniform(
    x: np.ndarray, bits: int, scale: float, *, stochastic: bool = False, seed: int = 0
) -> np.ndarray:
    """Symbols (uint8 in ``[0, 2**bits)``) of float32 ``x`` on the uniform grid over [-scale, scale].

    Values beyond ``scale`` clip to the end levels. ``scale = 0`` gives all-zero symbols (they
    decode to 0). NaN/Inf in ``x`` or a non-finite/negative scale raise ``ValueError``.
    """
    x = check_1d(x, np.float32)
    bits = check_int(bits, "bits", 1, 8)
    seed = check_int(seed, "seed", 0, 2**64 - 1)
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    _check_finite(x, "quantize_uniform")
    s, inv, _ = _uniform_params(bits, float(scale))
    if stochastic:
        return _quantize_stochastic(x, (1 << bits) - 1, s, inv, np.uint64(seed))
    return _quantize_nearest(x, (1 << bits) - 1, s, inv)


@jit
def _dequantize_uniform(q, scale, step):
    out = np.empty(q.size, np.float32)
    for i in range(q.size):
        out[i] = np.float32(q[i]) * step - scale
    return out


def dequantize_uniform(q: np.ndarray, bits: int, scale: float) -> np.ndarray:
    """float32 values ``q * step - scale`` of uniform symbols (``q`` uint8 below ``2**bits``)."""
    q = check_1d(q, np.uint8, "q")
    bits = check_int(bits, "bits", 1, 8)
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    if bits < 8 and q.size and int(q.max()) >= (1 << bits):
        raise ValueError(f"symbol {int(q.max())} out of range for {bits} bits")
    s, _, step = _uniform_params(bits, float(scale))
    return _dequantize_uniform(q, s, step)


@jit
def _sign_bits(x):
    out = np.empty(x.size, np.uint8)
    for i in range(x.size):
        out[i] = np.uint8(x[i] >= np.float32(0.0))
    return out


def quantize_sign(x: np.ndarray) -> np.ndarray:
    """1-bit symbols: 1 where ``x >= 0`` (also -0.0), 0 where ``x < 0``; decode as ``±mean|x|``.

    Sign compression with a scale as in signSGD with majority vote's scaled variant
    (Bernstein et al., ICML 2018) and EF-SignSGD (Karimireddy et al., ICML 2019).
    """
    x = check_1d(x, np.float32)
    _check_finite(x, "quantize_sign")
    return _sign_bits(x)


@jit
def _dequantize_sign(q, scale):
    out = np.empty(q.size, np.float32)
    for i in range(q.size):
        out[i] = scale if q[i] else -scale
    return out


def dequantize_sign(q: np.ndarray, scale: float) -> np.ndarray:
    """float32 ``+scale`` where ``q`` is 1, ``-scale`` where it is 0."""
    q = check_1d(q, np.uint8, "q")
    if q.size and int(q.max()) > 1:
        raise ValueError("sign symbols must be 0 or 1")
    return _dequantize_sign(q, np.float32(scale))
