"""Numba kernels: plain arrays in and out, one job each, thin checked wrappers.

Imported as ``hpcfed.kernels`` (setup.py maps this folder). Options live in ``_numba.py``;
the slow NumPy oracle for every kernel is ``tests/naive.py``.
"""

from hpcfed.kernels.topk import topk_abs

__all__ = ["topk_abs"]
