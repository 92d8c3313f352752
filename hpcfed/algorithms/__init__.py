"""One module per algorithm; ``make_strategy`` picks the job's."""

from hpcfed.algorithms.base import Strategy, Update


def make_strategy(job, flat, data, device, comm) -> Strategy:
    if job.algorithm == "fedavg":
        from hpcfed.algorithms.fedavg import FedAvg

        return FedAvg(job, flat, data, device, comm)
    if job.algorithm == "fedpt":
        from hpcfed.algorithms.fedpt import FedPT

        return FedPT(job, flat, data, device, comm)
    if job.algorithm == "prism":
        from hpcfed.algorithms.prism import Prism

        return Prism(job, flat, data, device, comm)
    if job.algorithm == "resfed":
        from hpcfed.algorithms.resfed import ResFed

        return ResFed(job, flat, data, device, comm)
    if job.algorithm == "hadfl":
        from hpcfed.algorithms.hadfl import HADFL

        return HADFL(job, flat, data, device, comm)
    if job.algorithm == "superfed":
        from hpcfed.algorithms.superfed import SuperFed

        return SuperFed(job, flat, data, device, comm)
    raise ValueError(f"unknown algorithm {job.algorithm!r}")  # config validation catches this first


__all__ = ["Strategy", "Update", "make_strategy"]
