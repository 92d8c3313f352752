"""One module per algorithm; ``make_strategy`` builds the job's through the registry.

The built-in classes are imported only when chosen, so a run loads one algorithm's dependencies
(ResFed's entropy coder, PriSM's profiler, ...). ``FedAvg`` is importable here for subclassing.
"""

from hpcfed.algorithms.base import Strategy, Update, strategy_class
from hpcfed.registry import BUILTINS

# algorithm name -> "module:Class" (the registry's table; kept under this name for readers)
STRATEGIES = {name: entry.target for name, entry in BUILTINS["algorithm"].items()}


def make_strategy(job, flat, data, device, comm) -> Strategy:
    return strategy_class(job.algorithm)(job, flat, data, device, comm)


def __getattr__(name: str):
    # hpcfed.algorithms.FedAvg etc. without importing every algorithm up front
    for entry in BUILTINS["algorithm"].values():
        module, _, cls = entry.target.partition(":")
        if cls == name:
            import importlib

            return getattr(importlib.import_module(module), cls)
    raise AttributeError(f"module 'hpcfed.algorithms' has no attribute {name!r}")


__all__ = ["STRATEGIES", "Strategy", "Update", "make_strategy", "strategy_class"]
