"""Uniform quantisation and bit packing fused into one pass: no intermediate symbol array.

``quantize_pack_uniform(x, bits, scale, ...)`` returns exactly the bytes of
``pack_bits(quantize_uniform(x, bits, scale, ...), bits)``: the same float32 arithmetic in the
same order per element (so the same symbols), laid out LSB first as in ``bitpack``. The NaN/Inf
check rides along in the same loop (a running max of ``|x|``'s bit pattern, as ``absmax``), so
``x`` is read once and the output written once.

Each width is its own compiled specialisation (``BITS`` a compile-time constant, as in
``bitpack``): widths dividing a byte (1, 2, 4, 8) build each output byte from ``8 // bits``
symbols; the others build ``bits`` output bytes from each group of 8 symbols in a 64-bit word.
"""

from __future__ import annotations

import numpy as np
from hpcfed.kernels._checks import check_1d, check_int
from hpcfed.kernels._numba import jit
from hpcfed.kernels.bitpack import packed_size
from hpcfed.kernels.quantize import _NONFINITE, _uniform_params
from hpcfed.kernels.topk import _splitmix64

_ABS_MASK = np.uint32(0x7FFFFFFF)
_U24 = np.float32(1.0 / 16777216.0)


def _make_fused(bits, stochastic):
    BITS = bits
    TOP = np.float32((1 << bits) - 1)
    STOCH = stochastic
    WHOLE = 8 % bits == 0
    PER = 8 // bits if WHOLE else 8  # symbols per output unit (a byte, or a ``BITS``-byte group)

    @jit
    def symbol(x, i, scale, inv_step, key):
        # the same expression, in the same order, as quantize._quantize_nearest/_stochastic
        if STOCH:
            h = _splitmix64(key ^ np.uint64(i))
            r = np.float32(h >> np.uint64(40)) * _U24
        else:
            r = np.float32(0.5)
        t = (x[i] + scale) * inv_step + r
        return np.uint32(np.int32(min(max(t, np.float32(0.0)), TOP)))

    @jit
    def fused(x, scale, inv_step, seed):
        n = x.size
        xb = x.view(np.uint32)
        out = np.empty((n * BITS + 7) // 8, np.uint8)
        key = _splitmix64(np.uint64(seed))
        worst = np.uint32(0)  # max |x| bit pattern: >= 0x7F800000 means NaN or Inf
        full = n // PER
        if WHOLE:
            for j in range(full):
                acc = np.uint32(0)
                for t in range(PER):
                    i = j * PER + t
                    worst = max(worst, xb[i] & _ABS_MASK)
                    acc |= symbol(x, i, scale, inv_step, key) << np.uint32(t * BITS)
                out[j] = np.uint8(acc)
        else:
            for j in range(full):
                acc = np.uint64(0)
                for t in range(8):
                    i = j * 8 + t
                    worst = max(worst, xb[i] & _ABS_MASK)
                    acc |= np.uint64(symbol(x, i, scale, inv_step, key)) << np.uint64(t * BITS)
                for b in range(BITS):
                    out[j * BITS + b] = np.uint8((acc >> np.uint64(8 * b)) & np.uint64(0xFF))
        # tail: fewer than PER symbols, accumulated and flushed the same way
        acc = np.uint64(0)
        for i in range(full * PER, n):
            s = symbol(x, i, scale, inv_step, key)
            worst = max(worst, xb[i] & _ABS_MASK)
            acc |= np.uint64(s) << np.uint64((i - full * PER) * BITS)
        o = full if WHOLE else full * BITS
        for b in range(out.size - o):
            out[o + b] = np.uint8((acc >> np.uint64(8 * b)) & np.uint64(0xFF))
        return out, worst

    return fused


_FUSED = {(b, s): _make_fused(b, s) for b in range(1, 9) for s in (False, True)}


def quantize_pack_uniform(
    x: np.ndarray, bits: int, scale: float, *, stochastic: bool = False, seed: int = 0
) -> np.ndarray:
    """``pack_bits(quantize_uniform(x, bits, scale, ...), bits)`` in one pass over ``x``.

    Returns ``packed_size(x.size, bits)`` uint8 bytes, identical to the two-step result. The
    arguments and errors are those of ``quantize_uniform`` (NaN/Inf in ``x`` or a non-finite or
    negative scale raise ``ValueError``).
    """
    x = check_1d(x, np.float32)
    bits = check_int(bits, "bits", 1, 8)
    seed = check_int(seed, "seed", 0, 2**64 - 1)
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    s, inv, _ = _uniform_params(bits, float(scale))
    out, worst = _FUSED[bits, bool(stochastic)](x, s, inv, np.uint64(seed))
    if worst >= _NONFINITE:
        raise ValueError("quantize_pack_uniform: x contains NaN or Inf")
    assert out.size == packed_size(x.size, bits)
    return out
