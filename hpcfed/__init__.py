"""hpcfed: federated learning on HPC clusters.

The public API (docs/api.md), every rank calling it, in a plain script or under mpirun/srun::

    import hpcfed
    result = hpcfed.run("job.toml", overrides=["rounds=20"])
    hpcfed.resume(result.run_dir, overrides=["rounds=40"])

Names are imported on first use, so ``import hpcfed`` (and the ``hpcfed`` command's start-up,
which installs its signal handlers first) does not pay for torch until it is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "run": "hpcfed.api",
    "resume": "hpcfed.api",
    "load_job": "hpcfed.api",
    "RunResult": "hpcfed.runner",
    "JobConfig": "hpcfed.config",
    "UserError": "hpcfed.errors",
    "RankFailed": "hpcfed.errors",
    "Strategy": "hpcfed.algorithms.base",
    "Update": "hpcfed.algorithms.base",
    "FederatedData": "hpcfed.data.federated",
    "load_state_dict": "hpcfed.io.checkpoint",
}
_MODULES = ("rng", "algorithms", "checkpoint")

__all__ = sorted([*_PUBLIC, *_MODULES, "__version__"])


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"hpcfed.{name}")
    else:
        raise AttributeError(f"module 'hpcfed' has no attribute {name!r}")
    globals()[name] = value  # once resolved, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
