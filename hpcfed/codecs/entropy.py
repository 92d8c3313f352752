"""Entropy coding of small-alphabet symbols with rANS (constriction's ``AnsCoder``).

Measured on this machine (benchmarks/bench_kernels.py): an ANS coder with the message's own
symbol histogram as its model lands within 0.3 % of the empirical (order-0) entropy on quantised
top-k survivors and dense 2/4-bit symbols, where zstd needs 20–50 % more at level 3 and 2–50 %
more at level 19, at far higher cost. ANS: Duda, arXiv 1311.2540; constriction: Bamler,
NeurIPS 2022 ("Understanding entropy coding with asymmetric numeral systems (ANS)", and the
library's paper).

Wire format: ``alphabet`` uint32 counts, then uint32 word count and the coder's uint32 words.
Encoder and decoder build the model from the same integer counts, so both quantise the same
floats to the same fixed-point table. The decoder checks that the decoded histogram equals the
transmitted counts, so a corrupt stream cannot pass as a wrong tensor.
"""

from __future__ import annotations

import numpy as np

from hpcfed.codecs.base import CodecError, Reader


def _model(counts: np.ndarray):
    import constriction  # imported lazily: only messages that use entropy coding need it

    return constriction.stream.model.Categorical(counts.astype(np.float64) / counts.sum(), perfect=False)


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical order-0 entropy in bits of a stream with these symbol counts (total, not per symbol)."""
    c = counts[counts > 0].astype(np.float64)
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(c * np.log2(p)).sum())


def encode_symbols(q: np.ndarray, alphabet: int) -> bytes:
    """rANS-code uint8 symbols below ``alphabet`` (<= 256) with their own histogram as model."""
    import constriction

    counts = np.bincount(q, minlength=alphabet).astype("<u4")
    if counts.size != alphabet:
        raise ValueError(f"symbol {int(q.max())} outside alphabet of {alphabet}")
    coder = constriction.stream.stack.AnsCoder()
    if q.size:
        coder.encode_reverse(q.astype(np.int32), _model(counts))
    words = coder.get_compressed().astype("<u4")
    return counts.tobytes() + np.uint32(words.size).astype("<u4").tobytes() + words.tobytes()


def decode_symbols(reader: Reader, alphabet: int, count: int) -> np.ndarray:
    """Read what :func:`encode_symbols` wrote for ``count`` symbols; ``CodecError`` if inconsistent."""
    import constriction

    counts = reader.array("<u4", alphabet)
    if int(counts.sum(dtype=np.int64)) != count:
        raise CodecError(f"entropy-coded stream: counts sum to {int(counts.sum())}, expected {count}")
    (nwords,) = reader.unpack("I")
    words = reader.array("<u4", nwords)
    if count == 0:
        return np.zeros(0, np.uint8)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        q = np.asarray(coder.decode(_model(counts), count))
    except Exception as exc:  # the Rust side reports malformed streams as Python exceptions
        raise CodecError(f"entropy-coded stream malformed: {exc}") from exc
    if q.size != count or q.min() < 0 or q.max() >= alphabet:
        raise CodecError("entropy-coded stream decoded to symbols outside the alphabet")
    q = q.astype(np.uint8)
    if not np.array_equal(np.bincount(q, minlength=alphabet), counts):
        raise CodecError("entropy-coded stream corrupt: decoded histogram differs from its header")
    return q
