"""Packing of b-bit symbols (1..8) into bytes, LSB first.

Symbol ``i`` occupies bits ``[i*b, (i+1)*b)`` of the little-endian bit stream, so for ``b = 1``
the layout equals ``np.packbits(q, bitorder="little")``. Padding bits in the last byte are 0.
Widths 1, 2, 4 and 8 divide a byte and get a straight loop (1 bit: a multiply per 8 symbols); the
others use a 64-bit accumulator.
"""

from __future__ import annotations

import numpy as np
from hpcfed.kernels._checks import check_1d, check_int
from hpcfed.kernels._numba import jit


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` symbols of ``bits`` bits."""
    return (n * bits + 7) // 8


def _make_pack_whole(bits):
    # widths that divide a byte: each output byte is an OR of PER shifted symbols. BITS and PER
    # are compile-time constants of each specialisation, so LLVM unrolls and vectorises the loop
    # (a runtime width made it ~20x slower than np.packbits).
    PER = 8 // bits
    BITS = bits

    @jit
    def pack(q):
        n = q.size
        full = n // PER
        out = np.zeros((n * BITS + 7) // 8, np.uint8)
        seen = np.uint8(0)  # OR of all symbols: an out-of-range one shows above the mask
        for j in range(full):
            acc = np.uint8(0)
            for t in range(PER):
                s = q[j * PER + t]
                seen |= s
                acc |= s << np.uint8(t * BITS)
            out[j] = acc
        for i in range(full * PER, n):
            s = q[i]
            seen |= s
            out[full] |= np.uint8(s << np.uint8((i - full * PER) * BITS))
        return out, np.uint32(seen)

    return pack


def _make_unpack_whole(bits):
    PER = 8 // bits
    BITS = bits
    MASK = (1 << bits) - 1

    @jit
    def unpack(data, n):
        out = np.empty(n, np.uint8)
        full = n // PER
        for j in range(full):
            b = data[j]
            for t in range(PER):
                out[j * PER + t] = (b >> np.uint8(t * BITS)) & np.uint8(MASK)
        for i in range(full * PER, n):
            out[i] = (data[full] >> np.uint8((i - full * PER) * BITS)) & np.uint8(MASK)
        return out

    return unpack


_PACK_WHOLE = {b: _make_pack_whole(b) for b in (1, 2, 4, 8)}
_UNPACK_WHOLE = {b: _make_unpack_whole(b) for b in (1, 2, 4, 8)}


@jit
def _pack_stream(q, bits):
    # other widths straddle bytes: a 64-bit accumulator flushed a byte at a time
    n = q.size
    out = np.zeros((n * bits + 7) // 8, np.uint8)
    seen = np.uint32(0)
    acc = np.uint64(0)
    nacc = 0
    o = 0
    for i in range(n):
        s = np.uint32(q[i])
        seen |= s
        acc |= np.uint64(s) << np.uint64(nacc)
        nacc += bits
        if nacc >= 8:
            out[o] = np.uint8(acc & np.uint64(0xFF))
            o += 1
            acc >>= np.uint64(8)
            nacc -= 8
    if nacc > 0:
        out[o] = np.uint8(acc & np.uint64(0xFF))
    return out, seen


_BYTE_LSBS = np.uint64(0x0102040810204080)


@jit
def _pack_one(words, tail):
    # 1 bit: each uint64 word holds 8 symbols (bytes of 0/1); multiplying by 2**56 + 2**49 + ...
    # + 2**7 moves byte t's low bit to bit 56 + t with no carries (all partial-product positions
    # differ), so the top byte is the packed byte, LSB first. Vectorises (vpmullq); as fast as
    # np.packbits, which would still need a separate pass to reject symbols above 1.
    out = np.empty(words.size + (1 if tail.size else 0), np.uint8)
    seen = np.uint64(0)
    for j in range(words.size):
        v = words[j]
        seen |= v
        out[j] = np.uint8((v * _BYTE_LSBS) >> np.uint64(56))
    if tail.size:
        acc = np.uint8(0)
        for i in range(tail.size):
            seen |= np.uint64(tail[i])
            acc |= tail[i] << np.uint8(i)
        out[words.size] = acc
    # any set bit outside each byte's bit 0 is a symbol above 1
    return out, np.uint32(1 if seen & ~np.uint64(0x0101010101010101) else 0)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 symbols ``q`` (each below ``2**bits``) into ``packed_size(q.size, bits)`` bytes."""
    q = check_1d(q, np.uint8, "q")
    bits = check_int(bits, "bits", 1, 8)
    if bits == 1:
        n8 = q.size // 8 * 8
        out, seen = _pack_one(q[:n8].view(np.uint64), q[n8:])
        seen <<= np.uint32(1)  # "some symbol > 1" as a bit above the 1-bit mask
    else:
        out, seen = _PACK_WHOLE[bits](q) if bits in _PACK_WHOLE else _pack_stream(q, bits)
    if seen >> bits:
        raise ValueError(f"pack_bits: a symbol does not fit in {bits} bits")
    return out


@jit
def _unpack(data, bits, n):
    out = np.empty(n, np.uint8)
    mask = np.uint8((1 << bits) - 1)
    acc = np.uint64(0)
    nacc = 0
    o = 0
    for i in range(n):
        if nacc < bits:
            acc |= np.uint64(data[o]) << np.uint64(nacc)
            o += 1
            nacc += 8
        out[i] = np.uint8(acc & np.uint64(mask))
        acc >>= np.uint64(bits)
        nacc -= bits
    return out


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` uint8 symbols from exactly ``packed_size(n, bits)`` bytes."""
    data = check_1d(data, np.uint8, "data")
    bits = check_int(bits, "bits", 1, 8)
    n = check_int(n, "n", 0, 2**62)
    if data.size != packed_size(n, bits):
        raise ValueError(
            f"unpack_bits: {data.size} bytes, {n} symbols of {bits} bits need {packed_size(n, bits)}"
        )
    return _UNPACK_WHOLE[bits](data, n) if bits in _UNPACK_WHOLE else _unpack(data, bits, n)


@jit
def _byte_histogram(data):
    # four interleaved tables: consecutive equal bytes do not wait on each other's increment
    h = np.zeros((4, 256), np.int64)
    n4 = data.size // 4 * 4
    for i in range(0, n4, 4):
        h[0, data[i]] += 1
        h[1, data[i + 1]] += 1
        h[2, data[i + 2]] += 1
        h[3, data[i + 3]] += 1
    for i in range(n4, data.size):
        h[0, data[i]] += 1
    return h.sum(axis=0)


@jit
def _count_stream(data, bits, n):
    counts = np.zeros(1 << bits, np.int64)
    mask = np.uint64((1 << bits) - 1)
    acc = np.uint64(0)
    nacc = 0
    o = 0
    for _ in range(n):
        if nacc < bits:
            acc |= np.uint64(data[o]) << np.uint64(nacc)
            o += 1
            nacc += 8
        counts[acc & mask] += 1
        acc >>= np.uint64(bits)
        nacc -= bits
    return counts


def packed_counts(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """``np.bincount(unpack_bits(data, bits, n), minlength=2**bits)`` without unpacking.

    The histogram an entropy coder needs, straight from ``pack_bits`` output: for widths dividing
    a byte a 256-bin byte histogram spread over the fields of each byte value (the zero padding
    of the last byte taken off symbol 0); for the others a streaming count.
    """
    data = check_1d(data, np.uint8, "data")
    bits = check_int(bits, "bits", 1, 8)
    n = check_int(n, "n", 0, 2**62)
    if data.size != packed_size(n, bits):
        raise ValueError(
            f"packed_counts: {data.size} bytes, {n} symbols of {bits} bits need {packed_size(n, bits)}"
        )
    if 8 % bits:
        return _count_stream(data, bits, n)
    per = 8 // bits
    h = _byte_histogram(data)
    byte = np.arange(256)
    counts = np.zeros(1 << bits, np.int64)
    for t in range(per):
        np.add.at(counts, (byte >> (t * bits)) & ((1 << bits) - 1), h)
    counts[0] -= data.size * per - n
    return counts
