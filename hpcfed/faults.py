"""Fault injection (``[faults]``): clients that drop out, straggle or send a non-finite update.

For testing a job's robustness, not for modelling a real fleet. Each sampled client's fate in a
round is drawn from the generator of (seed, "faults", round, client) (architecture principle 3):
every rank knows every client's fate without talking, a run is the same on any number of ranks,
and a resumed run replays the same faults.

- ``drop_prob``: the client drops out before training: it never runs, sends and receives nothing
  and its per-client state stays as it was. Counted in ``metrics/dropped_clients``.
- ``slow_prob``: a straggler. Round-based algorithms wait for it, but it completes only
  ``slow_work`` of its local steps (as in FedProx's systems-heterogeneity experiments, Li et al.
  2020, arXiv 1812.06127); its update is aggregated as usual. Counted in ``metrics/slow_clients``.
  Peer-to-peer schemes with their own clocks (HADFL) may read :meth:`Faults.fate` instead.
- ``nan_prob``: the client trains and sends, but its update reaches the server as NaN/Inf (a
  diverged or corrupted client). The engine's finiteness check rejects it before aggregation
  (``metrics/rejected_updates``), as it rejects any non-finite update, injected or not.

A client draws one uniform number per fault kind, so turning one probability up never changes
which clients suffer another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcfed.config import FaultsConfig
from hpcfed.rng import numpy_generator

FAULT_METRICS = ("dropped_clients", "slow_clients")  # per-round counts, summed over ranks


@dataclass(frozen=True)
class Fate:
    dropped: bool = False
    work: float = 1.0  # share of its local steps the client completes
    corrupt: bool = False

    @property
    def slow(self) -> bool:
        return self.work < 1.0


HEALTHY = Fate()


class Faults:
    def __init__(self, cfg: FaultsConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    @property
    def active(self) -> bool:
        return self.cfg.active

    def fate(self, round_index: int, client_id: int) -> Fate:
        if not self.cfg.active:
            return HEALTHY
        drop, slow, corrupt = numpy_generator(self.seed, "faults", round_index, client_id).random(3)
        if drop < self.cfg.drop_prob:
            return Fate(dropped=True)
        return Fate(
            work=self.cfg.slow_work if slow < self.cfg.slow_prob else 1.0,
            corrupt=bool(corrupt < self.cfg.nan_prob),
        )

    def corrupt(self, value: np.ndarray, round_index: int, client_id: int) -> np.ndarray:
        """A copy of ``value`` poisoned with NaN, +Inf or -Inf in one entry (chosen by the same key):
        a single bad entry is the hardest case for a check to catch."""
        rng = numpy_generator(self.seed, "faults.corrupt", round_index, client_id)
        out = np.array(value, dtype=np.float64, copy=True)
        out.reshape(-1)[rng.integers(out.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return out
