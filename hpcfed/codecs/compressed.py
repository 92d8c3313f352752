"""Top-k, quantisation and their chain as one self-describing message format.

A message (codec id 1) is the versioned header followed by:

- ``flags`` (u8): bit 0 = positions present (top-k or a median cut), bit 1 = values present;
- positions, if present: ``count`` (u64), Rice parameter (u8), byte length (u64), the Rice-coded
  gaps of the ascending indices (``hpcfed.kernels.gaps``);
- values, if present: ``kind`` (u8: 0 raw float32, 1 uniform, 2 median, 3 sign), ``bits`` (u8),
  ``coding`` (u8: 0 bit-packed, 1 rANS), then the kind's parameters (uniform/sign: scale f32;
  median: ``2**bits`` f32 codebook) and the symbols.

Every field is read through a bounds-checked reader and validated (counts, ranges, finite
parameters), so with the header's CRC32 a corrupt or truncated message is a ``CodecError``.
The decoder needs no configuration: any ``CompressedCodec`` decodes any codec-1 message.

Sparsity ``s`` keeps ``k = max(1, round((1 - s) * n))`` entries (``s = 0``: dense).
Sources: top-k sparsification with error feedback, Lin et al., "Deep Gradient Compression",
ICLR 2018; uniform quantisation, Alistarh et al., "QSGD", NeurIPS 2017; the median codebook and
top-k-then-quantise chain, Song et al., "ResFed", arXiv 2212.05602.
"""

from __future__ import annotations

import struct

import numpy as np

from hpcfed import kernels as K
from hpcfed.codecs import entropy
from hpcfed.codecs.base import CodecError, Reader, pack_header, unpack_header

QUANTIZERS = ("none", "uniform", "median", "sign")
_KIND = {"none": 0, "uniform": 1, "median": 2, "sign": 3}
_F_POS = 1
_F_VAL = 2
_GOLDEN = 0x9E3779B97F4A7C15


def keep_count(n: int, sparsity: float) -> int:
    """How many entries top-k keeps at this sparsity (all of them at ``sparsity = 0``)."""
    if n == 0 or sparsity == 0.0:
        return n
    return min(n, max(1, int(round((1.0 - sparsity) * n))))


class CompressedCodec:
    """Top-k (``sparsity > 0``), then quantisation of what is left (``quantization != "none"``).

    ``rounding`` is ``"nearest"`` or ``"stochastic"`` (uniform only); stochastic draws come from
    ``(seed, state["step"], index)``, so they do not depend on threads or rank layout.
    ``entropy=True`` rANS-codes the symbols when that is smaller than packing them.
    """

    codec_id = 1

    def __init__(
        self,
        sparsity: float = 0.0,
        quantization: str = "none",
        bits: int = 8,
        *,
        rounding: str = "nearest",
        seed: int = 0,
        entropy: bool = True,
    ):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if quantization not in QUANTIZERS:
            raise ValueError(f"quantization must be one of {QUANTIZERS}, got {quantization!r}")
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        self.sparsity = float(sparsity)
        self.quantization = quantization
        self.bits = 1 if quantization == "sign" else int(bits)
        self.rounding = rounding
        self.seed = int(seed) % 2**64
        self.entropy = bool(entropy)

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, x: np.ndarray, state: dict) -> tuple[bytes, dict]:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        state = dict(state)
        step = int(state.get("step", 0))
        state["step"] = step + 1
        n = x.size
        k = keep_count(n, self.sparsity)
        idx = None
        vals = x
        if k < n:
            idx, vals = K.topk_abs(x, k)
        parts = []
        kind = self.quantization
        if kind == "median":
            keep, symbols, codebook = K.quantize_median(np.ascontiguousarray(vals), self.bits)
            idx = np.flatnonzero(keep) if idx is None else idx[keep]
            symbols = np.ascontiguousarray(symbols[keep])
            values = (codebook.astype("<f4").tobytes(), symbols)
        elif kind == "uniform":
            scale = K.absmax(vals)
            msg_seed = (self.seed * _GOLDEN + step) % 2**64
            # one fused pass to the packed bytes; symbols only if rANS gets a try (_encode_symbols)
            packed = K.quantize_pack_uniform(
                vals, self.bits, scale, stochastic=self.rounding == "stochastic", seed=msg_seed
            )
            values = (struct.pack("<f", scale), (packed, vals.size))
        elif kind == "sign":
            scale = K.mean_abs(vals)
            values = (struct.pack("<f", scale), K.quantize_sign(vals))
        else:
            if not np.isfinite(vals).all():
                raise ValueError("cannot encode NaN or Inf")
            values = None
        flags = (_F_POS if idx is not None else 0) | _F_VAL
        parts.append(struct.pack("<B", flags))
        if idx is not None:
            parts.append(_encode_positions(idx.astype(np.int64, copy=False), n))
        if values is None:
            parts += [struct.pack("<BBB", 0, 32, 0), vals.astype("<f4").tobytes()]
        else:
            params, symbols = values
            coding, body = self._encode_symbols(symbols)
            parts += [struct.pack("<BBB", _KIND[kind], self.bits, coding), params, body]
        return pack_header(self.codec_id, n, b"".join(parts)), state

    def _encode_symbols(self, symbols) -> tuple[int, bytes]:
        """``symbols`` is a uint8 array, or ``(packed, count)`` already bit-packed."""
        if isinstance(symbols, tuple):
            packed_arr, count = symbols
        else:
            packed_arr, count = K.pack_bits(symbols, self.bits), symbols.size
        packed = packed_arr.tobytes()
        if self.entropy and count:
            # the histogram from the packed bytes (np.bincount on the symbols is ~15x slower)
            counts = K.packed_counts(packed_arr, self.bits, count)
            # skip the coder when the histogram says it cannot win (it costs ~30 ns/symbol)
            if entropy.entropy_bits(counts) / 8 + 4 * counts.size + 8 < len(packed):
                if isinstance(symbols, tuple):
                    symbols = K.unpack_bits(packed_arr, self.bits, count)
                coded = entropy.encode_symbols(symbols, 1 << self.bits)
                if len(coded) < len(packed):
                    return 1, coded
        return 0, packed

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, data: bytes, state: dict) -> tuple[np.ndarray, dict]:
        n, payload = unpack_header(data, self.codec_id)
        return decode_payload(payload, n), state


def _encode_positions(idx: np.ndarray, n: int) -> bytes:
    gaps = K.gaps_encode(idx, n)
    r = int(K.rice_parameter(gaps))
    coded = K.rice_encode(gaps, r)
    return struct.pack("<QBQ", idx.size, r, coded.size) + coded.tobytes()


def _decode_positions(rd: Reader, n: int) -> np.ndarray:
    count, r, nbytes = rd.unpack("QBQ")
    if count > n:
        raise CodecError(f"message lists {count} positions for {n} elements")
    if r > 62:
        raise CodecError(f"bad Rice parameter {r}")
    coded = np.frombuffer(rd.take(nbytes), np.uint8)
    try:
        return K.gaps_decode(K.rice_decode(np.ascontiguousarray(coded), r, count), n)
    except ValueError as exc:
        raise CodecError(f"positions corrupt: {exc}") from exc


def decode_payload(payload: memoryview, n: int) -> np.ndarray:
    """The float32 vector of length ``n`` that a codec-1 payload describes."""
    rd = Reader(payload)
    (flags,) = rd.unpack("B")
    if flags & ~(_F_POS | _F_VAL) or not flags & _F_VAL:
        raise CodecError(f"unknown flags {flags:#x}")
    idx = _decode_positions(rd, n) if flags & _F_POS else None
    count = n if idx is None else idx.size
    kind, bits, coding = rd.unpack("BBB")
    if kind == 0:
        if bits != 32 or coding != 0:
            raise CodecError("raw values must be 32-bit and unpacked")
        vals = rd.array("<f4", count)
    elif kind in (1, 2, 3):
        if not 1 <= bits <= 8 or (kind == 3 and bits != 1):
            raise CodecError(f"bad bit width {bits} for quantiser {kind}")
        nparams = 1 << bits if kind == 2 else 1
        params = rd.array("<f4", nparams)
        if not np.isfinite(params).all() or (kind != 2 and params[0] < 0):
            raise CodecError("quantiser parameters are not finite (or a negative scale)")
        symbols = _decode_symbols(rd, coding, bits, count)
        if kind == 1:
            vals = K.dequantize_uniform(symbols, bits, float(params[0]))
        elif kind == 3:
            if symbols.size and symbols.max() > 1:
                raise CodecError("sign symbols must be 0 or 1")
            vals = K.dequantize_sign(symbols, float(params[0]))
        else:
            vals = params[symbols]
    else:
        raise CodecError(f"unknown quantiser kind {kind}")
    rd.done()
    if not np.isfinite(vals).all():
        raise CodecError("decoded values are not finite")
    if idx is None:
        return vals.astype(np.float32, copy=False)
    out = np.zeros(n, np.float32)
    out[idx] = vals
    return out


def _decode_symbols(rd: Reader, coding: int, bits: int, count: int) -> np.ndarray:
    if coding == 0:
        data = np.frombuffer(rd.take(K.packed_size(count, bits)), np.uint8)
        return K.unpack_bits(np.ascontiguousarray(data), bits, count)
    if coding == 1:
        return entropy.decode_symbols(rd, 1 << bits, count)
    raise CodecError(f"unknown symbol coding {coding}")


class TopKCodec(CompressedCodec):
    """Top-k by magnitude, survivors sent as float32 (DGC's sparsification, Lin et al. 2018)."""

    def __init__(self, sparsity: float):
        super().__init__(sparsity, "none")


class QuantizeCodec(CompressedCodec):
    """Dense quantisation: ``uniform`` (b bits), ``median`` (ResFed codebook) or ``sign``."""

    def __init__(self, quantization: str, bits: int = 8, **kw):
        super().__init__(0.0, quantization, bits, **kw)


class ChainCodec(CompressedCodec):
    """Top-k, then quantisation of the survivors (ResFed's residual compression)."""
