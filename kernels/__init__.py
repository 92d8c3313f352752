"""Numba kernels: plain arrays in and out, one job each, thin checked wrappers.

Imported as ``hpcfed.kernels`` (setup.py maps this folder). Options live in ``_numba.py``;
the slow NumPy oracle for every kernel is ``tests/naive.py``.
"""

from hpcfed.kernels.bitpack import pack_bits, packed_counts, packed_size, unpack_bits
from hpcfed.kernels.fused import quantize_pack_uniform
from hpcfed.kernels.gaps import gaps_decode, gaps_encode, rice_decode, rice_encode, rice_parameter
from hpcfed.kernels.median import quantize_median
from hpcfed.kernels.quantize import (
    absmax,
    dequantize_sign,
    dequantize_uniform,
    mean_abs,
    quantize_sign,
    quantize_uniform,
)
from hpcfed.kernels.topk import topk_abs

__all__ = [
    "absmax",
    "dequantize_sign",
    "dequantize_uniform",
    "gaps_decode",
    "gaps_encode",
    "mean_abs",
    "pack_bits",
    "packed_counts",
    "packed_size",
    "quantize_median",
    "quantize_pack_uniform",
    "quantize_sign",
    "quantize_uniform",
    "rice_decode",
    "rice_encode",
    "rice_parameter",
    "topk_abs",
    "unpack_bits",
]
