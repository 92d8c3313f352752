"""The seam every algorithm plugs into: a Strategy that the round engine drives, and Update.

Architecture principle 2 (additive contributions): a client returns ``value = w·x`` and
``weight = w`` (a scalar, or one weight per element where clients train overlapping slices); the
engine sums them on the rank, then over ranks in one Allreduce, and every rank runs the same
server step on the totals. We use flat vectors rather than dicts of tensors: the engine then packs
a round into one buffer without per-tensor loops, and slices of a model are index ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hpcfed import registry
from hpcfed.errors import UserError
from hpcfed.flat import FlatModel

if TYPE_CHECKING:  # config imports this module lazily, to let each class check its own keys
    from pydantic import BaseModel

    from hpcfed.config import JobConfig
    from hpcfed.train import LocalSGD

# Metric sums every algorithm reports per client; they ride on the round's Allreduce.
BASE_METRICS = ("loss_sum", "samples", "bytes_up", "bytes_down")


@dataclass
class Update:
    value: np.ndarray  # float64 [P]: sum over clients of w * x
    weight: float | np.ndarray  # scalar sum of w, or float64 [P] per element
    metrics: dict[str, float] = field(default_factory=dict)
    # further named sums in the round's one Allreduce (a strategy's ``extra_sums``): SCAFFOLD's
    # control-variate changes, FedNova's normalising weights; float64 arrays or scalars
    extras: dict[str, np.ndarray | float] = field(default_factory=dict)


class Strategy:
    """One federated algorithm: the built-ins, one per module under ``hpcfed/algorithms``, and
    user algorithms (``algorithm = "mylab.algos:MyStrategy"``) alike. docs/algorithms.md says how
    the engine drives it; the methods below are the whole contract.

    State is explicit (architecture principle 6): the replicated server state is a dict of NumPy
    arrays (``"model"`` is the flat float32 global model), so a checkpoint is its serialisation.
    Every rank holds it and runs the same server step; a client's ``client_update`` runs on one
    rank and returns an additive :class:`Update`.
    """

    name = "base"
    per_element_weights = False  # True when clients train overlapping slices
    extra_metrics: tuple[str, ...] = ()  # further per-client sums this algorithm reports (logged)
    # further named sums the round's Allreduce carries, name -> length (not logged): a client's
    # ``Update.extras[name]``, summed over the cohort, reaches ``server_update`` in ``total.extras``
    extra_sums: ClassVar[dict[str, int]] = {}
    # What the engine may combine with this algorithm (checked when the job is loaded):
    supports_dp: ClassVar[bool] = False  # implements [dp] (clipping + noise) itself
    supports_robust: ClassVar[bool] = False  # one scalar-weighted update per client: [robust] applies
    uses_cohort: ClassVar[bool] = True  # samples clients_per_round of data.num_clients each round
    # The keys of the job's [strategy] table: a pydantic model (unknown keys are errors); None
    # takes the table as a plain dict.
    Options: ClassVar[type[BaseModel] | None] = None
    # the group of clients the engine is training at once (hpcfed.executor.GroupRun), or None
    group = None

    def __init__(self, job: JobConfig, flat: FlatModel, data, device, comm):
        self.job = job
        self.flat = flat
        self.data = data
        self.device = device
        self.comm = comm
        self.options = type(self).parse_options(job.strategy)  # the validated [strategy] table

    # -- the job's keys, checked on load (before any data or model exists) -----------------------
    @classmethod
    def check_job(cls, job: JobConfig) -> None:
        """Raise :class:`UserError` naming the key if this algorithm cannot run ``job``.
        Subclasses extend it with their own checks (calling ``super().check_job(job)``)."""
        if job.dp is not None and not cls.supports_dp:
            raise UserError(
                "[dp] works with fedavg, fedpt (strategies with supports_dp), "
                f"not algorithm {job.algorithm!r}"
            )
        if job.robust.active and not cls.supports_robust:
            # clipping and medians act on one update per client with one scalar weight; per-element
            # weights (sub-models), residual streams and peer exchanges have no such update
            raise UserError(
                "[robust] works with fedavg, fedpt (strategies with supports_robust), "
                f"not algorithm {job.algorithm!r}"
            )
        if cls.uses_cohort and job.clients_per_round > job.data.num_clients:
            raise UserError(
                f"clients_per_round ({job.clients_per_round}) exceeds "
                f"data.num_clients ({job.data.num_clients})"
            )
        if job.strategy and cls.Options is None and registry.builtin("algorithm", job.algorithm):
            raise UserError(
                f"strategy: the [strategy] table holds a user algorithm's keys; algorithm "
                f"{job.algorithm!r} takes its own [{job.algorithm}] table"
            )
        cls.parse_options(job.strategy)

    @classmethod
    def parse_options(cls, table: dict[str, Any]) -> Any:
        """The ``[strategy]`` table validated by :attr:`Options` (or the dict itself without one)."""
        if cls.Options is None:
            return dict(table)
        from pydantic import ValidationError

        known = set(cls.Options.model_fields)
        for key in table:
            if key not in known:
                raise UserError(
                    f"strategy.{key}: unknown key for {cls.__name__} "
                    f"(its options: {', '.join(sorted(known))})"
                )
        try:
            return cls.Options.model_validate(table)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in ("strategy", *err["loc"]))
            raise UserError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None

    # -- local training, for any strategy --------------------------------------------------------
    @cached_property
    def trainer(self) -> LocalSGD:
        """Local SGD on the job's ``[train]`` keys over the model's trainable parameters."""
        from hpcfed.train import LocalSGD

        return LocalSGD(self.flat.module, self.job.train)

    def train_client(self, client_id: int, round_index: int, correction=None) -> tuple[float, int, int]:
        """Train ``self.flat.module`` in place, from whatever it holds, on client ``client_id``'s
        data in the order of its own generator (seed, round, client); returns (mean training loss,
        steps, samples). Load the start point first (``self.flat.set(vector)``). ``correction``
        (a :class:`hpcfed.train.GradientCorrection`) changes every local gradient: a proximal
        term, control variates."""
        from hpcfed.rng import torch_generator

        group = self.group  # clients the engine trains at once (hpcfed/executor.py), or None
        if group is not None and client_id in group.clients:
            done = group.result(self, client_id, round_index, correction)
            if done is not None:  # the group started from this same model: take its result
                self.flat.set(done.vector)
                return done.loss, done.steps, int(self.data.client_sizes[client_id])
        x, y = self.data.client(client_id)
        x, y = x.to(self.device), y.to(self.device)
        gen = torch_generator(self.job.seed, "train", round_index, client_id)
        loss, steps = self.trainer.train(x, y, gen, correction=correction)
        return loss, steps, int(y.shape[0])

    def correction(self, *, prox_mu: float = 0.0, anchor=None, offset=None):
        """A :class:`hpcfed.train.GradientCorrection` over this strategy's trained parameters."""
        from hpcfed.train import GradientCorrection

        return GradientCorrection.for_model(
            self.flat, self.trainer.opt.params, prox_mu=prox_mu, anchor=anchor, offset=offset
        )

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

    def group_update(self, state: dict[str, np.ndarray], client_ids: list[int], round_index: int):
        """Optional: the summed :class:`Update` of a group the engine trains at once (``self.group``),
        equal to the sum of the clients' ``client_update``; None (the default) runs them one by one."""
        return None

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

    def extra_sums_sizes(self) -> dict[str, int]:
        """:attr:`extra_sums`, or sizes known only once the model exists (override)."""
        return dict(self.extra_sums)

    def layout(self) -> dict[str, int]:
        """Sizes of the round's packed Allreduce buffer."""
        p = self.flat.size
        sizes = {"value": p, "weight": p if self.per_element_weights else 1}
        sizes.update({m: 1 for m in (*BASE_METRICS, *self.extra_metrics)})
        sizes.update({f"extra.{name}": n for name, n in self.extra_sums_sizes().items()})
        return sizes


def strategy_class(value: str) -> type[Strategy]:
    """The Strategy subclass ``algorithm = value`` names (a built-in or ``"module:Class"``)."""
    cls = registry.resolve("algorithm", value)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UserError(
            f"algorithm = {value!r}: expected a subclass of hpcfed.Strategy, got {type(cls).__name__} {cls!r}"
        )
    return cls


def weighted_mean(total: Update, old: np.ndarray) -> np.ndarray:
    """``value / weight`` where ``weight > 0``, else the old entry (nobody trained it)."""
    weight = np.asarray(total.weight, dtype=np.float64)
    if weight.size == 1:
        return total.value / weight.item() if weight.item() > 0 else old.astype(np.float64)
    out = old.astype(np.float64)
    trained = weight > 0
    np.divide(total.value, weight, out=out, where=trained)
    return out
