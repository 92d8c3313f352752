"""Argument checks shared by the thin wrappers around the kernels.

Kernels never convert or copy silently: a wrong dtype raises ``TypeError`` and a wrong shape or
a non-contiguous view raises ``ValueError``, so a caller learns about a hidden copy of 100 MB.
"""

from __future__ import annotations

import numpy as np


def check_1d(x, dtype, name: str = "x") -> np.ndarray:
    """Return ``x`` if it is a 1-D C-contiguous ndarray of ``dtype``; raise otherwise."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {x.dtype.name}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return x


def check_int(v, name: str, lo: int, hi: int) -> int:
    """Return ``v`` as int if it is an integer in [lo, hi]; raise otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return int(v)
