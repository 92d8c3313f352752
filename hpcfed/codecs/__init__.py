"""Codecs: a flat float32 vector to bytes and back (see base.py).

``make_codec`` builds what a job's ``[compress]`` table asks for.
"""

from hpcfed.codecs.base import Codec, CodecError
from hpcfed.codecs.feedback import ErrorFeedback
from hpcfed.codecs.identity import IdentityCodec

# The compressing codecs load on first use: they pull in the Numba kernels (numba and llvmlite,
# ~110 MB of resident memory and about a second of start-up), which an uncompressed run never needs.
_COMPRESSED = ("QUANTIZERS", "ChainCodec", "CompressedCodec", "QuantizeCodec", "TopKCodec")


def __getattr__(name: str):
    if name in _COMPRESSED:
        from hpcfed.codecs import compressed

        return getattr(compressed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_codec(
    sparsity: float = 0.0,
    quantization: str = "none",
    bits: int = 8,
    error_feedback: bool = False,
    seed: int = 0,
    rounding: str = "nearest",
    entropy: bool = True,
) -> Codec:
    """The codec for a ``[compress]`` table: identity when nothing is compressed.

    ``sparsity`` in [0, 1) (top-k keeps ``round((1 - sparsity) * n)``), ``quantization`` one of
    none|uniform|median|sign, ``bits`` 1..8 (ignored for sign and none), ``error_feedback`` wraps
    the codec in :class:`ErrorFeedback`, ``seed``/``rounding`` drive stochastic rounding.
    """
    if sparsity == 0.0 and quantization == "none":
        codec = IdentityCodec()
    else:
        from hpcfed.codecs.compressed import CompressedCodec

        codec = CompressedCodec(sparsity, quantization, bits, rounding=rounding, seed=seed, entropy=entropy)
    return ErrorFeedback(codec) if error_feedback else codec


__all__ = [
    "QUANTIZERS",
    "ChainCodec",
    "Codec",
    "CodecError",
    "CompressedCodec",
    "ErrorFeedback",
    "IdentityCodec",
    "QuantizeCodec",
    "TopKCodec",
    "make_codec",
]
