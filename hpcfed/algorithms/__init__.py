"""One module per algorithm; ``make_strategy`` picks the job's."""

import importlib

from hpcfed.algorithms.base import Strategy, Update

# algorithm name -> (module under hpcfed.algorithms, Strategy class); imported only when chosen, so
# a run loads one algorithm's dependencies (ResFed's entropy coder, PriSM's profiler, ...)
STRATEGIES = {
    "fedavg": ("fedavg", "FedAvg"),
    "fedpt": ("fedpt", "FedPT"),
    "prism": ("prism", "Prism"),
    "resfed": ("resfed", "ResFed"),
    "hadfl": ("hadfl", "HADFL"),
    "superfed": ("superfed", "SuperFed"),
}


def make_strategy(job, flat, data, device, comm) -> Strategy:
    if job.algorithm not in STRATEGIES:  # config validation catches this first
        raise ValueError(f"unknown algorithm {job.algorithm!r}")
    module, name = STRATEGIES[job.algorithm]
    cls = getattr(importlib.import_module(f"hpcfed.algorithms.{module}"), name)
    return cls(job, flat, data, device, comm)


__all__ = ["STRATEGIES", "Strategy", "Update", "make_strategy"]
