"""The seam every algorithm plugs into: a Strategy that the round engine drives, and Update.

Architecture principle 2 (additive contributions): a client returns ``value = w·x`` and
``weight = w`` (a scalar, or one weight per element where clients train overlapping slices); the
engine sums them on the rank, then over ranks in one Allreduce, and every rank runs the same
server step on the totals. We use flat vectors rather than dicts of tensors: the engine then packs
a round into one buffer without per-tensor loops, and slices of a model are index ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpcfed.config import JobConfig
from hpcfed.flat import FlatModel

# Metric sums every algorithm reports per client; they ride on the round's Allreduce.
BASE_METRICS = ("loss_sum", "samples", "bytes_up", "bytes_down")


@dataclass
class Update:
    value: np.ndarray  # float64 [P]: sum over clients of w * x
    weight: float | np.ndarray  # scalar sum of w, or float64 [P] per element
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy:
    """One federated algorithm. Subclasses live one per module under ``hpcfed/algorithms``.

    State is explicit (architecture principle 6): the replicated server state is a dict of NumPy
    arrays (``"model"`` is the flat float32 global model), so a checkpoint is its serialisation.
    """

    name = "base"
    per_element_weights = False  # True when clients train overlapping slices
    extra_metrics: tuple[str, ...] = ()  # further per-client sums this algorithm reports

    def __init__(self, job: JobConfig, flat: FlatModel, data, device, comm):
        self.job = job
        self.flat = flat
        self.data = data
        self.device = device
        self.comm = comm

    @property
    def placement(self) -> str:
        """'balanced', or 'fixed' when clients keep state on a home rank."""
        return self.job.placement

    # -- server side, replicated on every rank -------------------------------------------------
    def init_state(self) -> dict[str, np.ndarray]:
        return {"model": self.flat.get()}

    def begin_round(self, state: dict[str, np.ndarray], round_index: int) -> None:
        """Work shared by all of a rank's clients this round (e.g. encode the global model once)."""

    def server_update(self, state: dict[str, np.ndarray], total: Update, round_index: int) -> dict:
        raise NotImplementedError

    def eval_vector(self, state: dict[str, np.ndarray]) -> np.ndarray:
        return state["model"]

    def server_metrics(self, state: dict[str, np.ndarray], round_index: int) -> dict[str, float]:
        """Per-round values computed by the (replicated) server, logged as ``metrics/<name>``
        (e.g. ``epsilon``). Called on every rank after :meth:`server_update`."""
        return {}

    # -- further evaluations, logged as groups of log.h5 (e.g. SuperFed's ``family/``) ----------
    def log_groups(self) -> dict[str, dict]:
        """``{group: attributes}`` of this algorithm's own groups in ``log.h5``."""
        return {}

    def eval_sums(self, state: dict[str, np.ndarray], x, y) -> np.ndarray:
        """Sums over this rank's test shard ``(x, y)`` at an evaluation; the engine adds them over
        ranks (in the evaluation's Allreduce) and hands the totals to :meth:`eval_rows`."""
        return np.zeros(0)

    def eval_rows(self, sums: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """``{group: {dataset: row}}`` of one evaluation, from the summed :meth:`eval_sums`."""
        return {}

    # -- client side ---------------------------------------------------------------------------
    def client_update(self, state: dict[str, np.ndarray], client_id: int, round_index: int) -> Update:
        raise NotImplementedError

    # -- state beyond the server's (per-client state), for checkpoints ---------------------------
    def extra_state(self) -> dict[str, np.ndarray]:
        """This rank's part of the per-client state (the engine gathers every rank's)."""
        return {}

    def iter_extra_state(self):
        """:meth:`extra_state` as ``(name, array)`` pairs; override to produce them lazily (the
        engine streams them into the checkpoint one at a time)."""
        yield from self.extra_state().items()

    def load_extra_state(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"{self.name} keeps no extra state, checkpoint has {sorted(arrays)}")

    def layout(self) -> dict[str, int]:
        """Sizes of the round's packed Allreduce buffer."""
        p = self.flat.size
        sizes = {"value": p, "weight": p if self.per_element_weights else 1}
        sizes.update({m: 1 for m in (*BASE_METRICS, *self.extra_metrics)})
        return sizes


def weighted_mean(total: Update, old: np.ndarray) -> np.ndarray:
    """``value / weight`` where ``weight > 0``, else the old entry (nobody trained it)."""
    weight = np.asarray(total.weight, dtype=np.float64)
    if weight.size == 1:
        return total.value / weight.item() if weight.item() > 0 else old.astype(np.float64)
    out = old.astype(np.float64)
    trained = weight > 0
    np.divide(total.value, weight, out=out, where=trained)
    return out
