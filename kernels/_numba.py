"""The one place that sets Numba options for every kernel (architecture.md, principle 7).

- ``nogil=True``: kernels release the GIL, so a caller may overlap them with other work.
- ``cache=False`` unless ``HPCFED_NUMBA_CACHE=1``: Numba's on-disk cache can load a stale or
  foreign build when several ranks share a file system or a package is reinstalled
  (numba/numba#4549), so a fresh compile per process is the safe default.
- ``fastmath=False``: kernels must give bit-identical results to the NumPy oracle in
  ``tests/naive.py``; fast-math would let LLVM reassociate sums and drop NaN checks.
- No ``parallel=True``: every kernel is single-threaded, so results cannot depend on the
  thread count (one rank per core is the deployment model, benchmarks.md).
"""

from __future__ import annotations

import os

import numba

OPTIONS = {
    "nogil": True,
    "cache": os.environ.get("HPCFED_NUMBA_CACHE", "0") == "1",
    "fastmath": False,
    "boundscheck": False,
}


def jit(fn):
    """``numba.njit`` with the project's options."""
    return numba.njit(**OPTIONS)(fn)
