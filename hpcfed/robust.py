"""What the engine checks and changes in client updates before they are aggregated.

- Every update, of every algorithm, must be finite: one NaN or Inf in a sum would poison the global
  model on every rank at once, so a non-finite update is rejected (``metrics/rejected_updates``).
- ``[robust] clip_norm``: each client's update (its delta ``value / weight``) is scaled down to at
  most this L2 norm, bounding what any one client can move the model.
- ``[robust] aggregate = "median" | "trimmed_mean"``: the coordinate-wise median or trimmed mean of
  the clients' deltas (Yin et al., ICML 2018, arXiv 1803.01498), unweighted by sample counts as
  there. These are not sums, so the round's one Allreduce of P values cannot carry them: every
  rank Allgathers the deltas of the whole cohort (K x P float64, K = clients reporting) and takes
  the same statistic. That is K times the traffic and memory of the mean, fine for the simulated
  cohorts of tens of clients hpcfed runs, not for thousands.

Only algorithms whose clients send one update with one scalar weight (FedAvg, FedPT) take
``[robust]``; the job schema refuses it elsewhere.
"""

from __future__ import annotations

import numpy as np

from hpcfed.algorithms.base import Update
from hpcfed.config import RobustConfig


def is_finite(update: Update) -> bool:
    # NaN and +-Inf always propagate into a sum; a finite float64 sum of float32-sized deltas times
    # sample counts cannot overflow. One pass without allocating a P-sized mask.
    return bool(np.isfinite(np.sum(update.value)) and np.isfinite(np.sum(update.weight)))


def clip_delta(update: Update, max_norm: float) -> Update:
    """Scale the client's delta ``value / weight`` to L2 norm <= ``max_norm`` (weight unchanged)."""
    weight = float(update.weight)
    if weight <= 0:
        return update
    norm = float(np.linalg.norm(update.value)) / weight
    if norm <= max_norm:
        return update
    return Update(update.value * (max_norm / norm), update.weight, update.metrics)


def coordinate_stat(deltas: np.ndarray, aggregate: str, trim: float) -> np.ndarray:
    """Median or trimmed mean over axis 0 of a (clients, P) matrix: ``floor(trim * K)`` values are
    cut at each end of every coordinate (``trim < 0.5`` keeps at least one)."""
    if aggregate == "median":
        return np.median(deltas, axis=0)
    k = deltas.shape[0]
    cut = int(np.floor(trim * k))
    ordered = np.sort(deltas, axis=0)
    return ordered[cut : k - cut].mean(axis=0)


class RobustAggregation:
    """Clips updates as they arrive; for median/trimmed mean keeps this rank's deltas and, after the
    round's Allreduce, gathers the cohort's and replaces the summed update by the statistic."""

    def __init__(self, cfg: RobustConfig, comm):
        self.cfg, self.comm = cfg, comm
        self.gathers = cfg.aggregate != "mean"
        self._ids: list[int] = []
        self._rows: list[np.ndarray] = []

    def admit(self, update: Update, client_id: int) -> Update:
        """A finite client update on its way into the round's sums."""
        if self.cfg.clip_norm is not None:
            update = clip_delta(update, self.cfg.clip_norm)
        if self.gathers and float(update.weight) > 0:
            self._ids.append(int(client_id))
            self._rows.append(np.asarray(update.value, dtype=np.float64) / float(update.weight))
        return update

    def combine(self, total: Update) -> Update:
        """Every rank calls this after the Allreduce (it is a collective when gathering)."""
        if not self.gathers:
            return total
        ids, rows = self._ids, self._rows
        self._ids, self._rows = [], []
        size = total.value.size
        mine = np.stack(rows) if rows else np.empty((0, size))
        if self.comm.Get_size() > 1:
            from mpi4py import MPI

            all_ids = self.comm.allgather(ids)  # small metadata: who reported, on which rank
            counts = np.array([len(i) * size for i in all_ids])
            everyone = np.empty((sum(len(i) for i in all_ids), size))
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self.comm.Allgatherv(
                [np.ascontiguousarray(mine), MPI.DOUBLE], [everyone, counts, displs, MPI.DOUBLE]
            )
            ids = [c for part in all_ids for c in part]
            mine = everyone
        if not ids:
            return total  # nobody reported: the engine keeps the model
        # client order, so the statistic's float rounding is the same on any number of ranks
        deltas = mine[np.argsort(ids, kind="stable")]
        return Update(coordinate_stat(deltas, self.cfg.aggregate, self.cfg.trim), 1.0, total.metrics)
