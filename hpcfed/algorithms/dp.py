"""The ``[dp]`` table: DP-FedAvg's clipping, central Gaussian noise and the RDP accountant.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, arXiv 1710.06963; the form FedPT's paper,
Sidahmed, Xu et al. arXiv 2110.03450, evaluates): each client's update (its model delta, or for
FedPT the delta of its trainable part) is clipped to L2 norm ``S = clip``; the server sums the
clipped updates, adds ``N(0, sigma^2 S^2)`` once per coordinate, and divides by the cohort size.
Every client counts 1 (not its sample count): with weights, one client's influence, hence the
sensitivity, would be unbounded. The privacy unit is the client (user-level DP).

Where we are specific:

* Clipping applies to what the server decodes from a client's bytes, so the bound holds for what
  is summed even when a lossy ``[compress]`` codec sits in between.
* The noise is one vector per round, drawn from ``numpy_generator(seed, "dp-noise", round)``, so
  every rank adds the same noise without talking and a resumed run replays it exactly (a
  simulation's noise, reproducible on purpose). ``secure_noise = true`` draws it on rank 0 from a
  generator seeded by the OS (``secrets``) and ``Bcast``s it: not reproducible, by design.
* The denominator is the fixed cohort size ``clients_per_round`` (McMahan et al.'s fixed-
  denominator estimator), which here equals the number of clients that reported.
* epsilon for ``delta`` comes from dp-accounting's RDP accountant (``RdpAccountant``) with one
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` per round, ``q = clients_per_round /
  num_clients``. Our cohorts are fixed-size samples without replacement, not Poisson samples:
  the Poisson accounting is the usual approximation (as in TFF's and Opacus' DP-FedAvg). RDP
  composes additively, so epsilon after ``t`` rounds is the accountant's epsilon for ``t`` times
  one round's RDP vector: computed from the round count, it needs no state and resumes exactly.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

from hpcfed.config import DPConfig
from hpcfed.rng import numpy_generator

# Per-client sums a DP strategy adds to the round's Allreduce: how many updates were clipped.
DP_METRICS = ("clipped_updates",)


def clip_l2(x: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """``x * min(1, bound / ||x||_2)`` in float64, and whether it was scaled down."""
    x = np.asarray(x, dtype=np.float64)
    norm = float(np.sqrt(np.dot(x, x)))
    if norm <= bound:
        return x, False
    return x * (bound / norm), True


class DifferentialPrivacy:
    """Clipping, noise and epsilon for one job; the same object on every rank."""

    def __init__(self, cfg: DPConfig, seed: int, comm, num_clients: int, clients_per_round: int):
        self.cfg, self.seed, self.comm = cfg, seed, comm
        self.cohort = clients_per_round
        self.sampling_rate = clients_per_round / num_clients
        self._orders, self._rdp_one_round = one_round_rdp(self.sampling_rate, cfg.noise_multiplier)

    # -- client side -------------------------------------------------------------------------------
    def clip(self, update: np.ndarray) -> tuple[np.ndarray, bool]:
        return clip_l2(update, self.cfg.clip)

    # -- server side (replicated) ---------------------------------------------------------------------
    def noise(self, size: int, round_index: int) -> np.ndarray:
        """``N(0, (sigma S)^2)`` per coordinate, the same vector on every rank."""
        std = self.cfg.noise_multiplier * self.cfg.clip
        if not self.cfg.secure_noise:
            return std * numpy_generator(self.seed, "dp-noise", round_index).standard_normal(size)
        out = np.empty(size, dtype=np.float64)
        if self.comm.Get_rank() == 0:
            out[:] = std * np.random.default_rng(secrets.randbits(128)).standard_normal(size)
        if self.comm.Get_size() > 1:
            self.comm.Bcast(out, root=0)  # upper-case: the buffer itself, no pickling
        return out

    def average(self, clipped_sum: np.ndarray, round_index: int) -> np.ndarray:
        """(sum of clipped updates + noise) / cohort size."""
        return (clipped_sum + self.noise(clipped_sum.size, round_index)) / self.cohort

    def epsilon(self, rounds_done: int) -> float:
        return epsilon_after(self._orders, self._rdp_one_round, rounds_done, self.cfg.delta)


def one_round_rdp(q: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP of one round) from dp-accounting's RdpAccountant (imported here: optional)."""
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError as exc:  # pragma: no cover - the dependency ships with the dp extra
        raise ImportError("[dp] needs dp-accounting: pip install 'hpcfed[dp]'") from exc
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    absl = logging.getLogger("absl")  # it warns about orders it skips; epsilon is still right
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant.compose(event, 1)
    finally:
        absl.setLevel(level)
    return accountant.orders, accountant.rdp


def epsilon_after(orders: np.ndarray, rdp_one_round: np.ndarray, rounds: int, delta: float) -> float:
    """epsilon for ``delta`` after ``rounds`` compositions (RDP adds up over rounds)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if rounds <= 0:
        return 0.0
    return float(compute_epsilon(orders, rounds * rdp_one_round, delta)[0])


def make_dp(job, num_clients: int, comm) -> DifferentialPrivacy | None:
    """The job's DP, or None without a ``[dp]`` table."""
    if job.dp is None:
        return None
    return DifferentialPrivacy(job.dp, job.seed, comm, num_clients, job.clients_per_round)
