"""SuperFed: a weight-shared family of models trained at the cost of one (Khare et al.,
"SuperFedNAS: Cost-Efficient Federated Neural Architecture Search for On-Device Inference",
arXiv 2301.10879; the authors' "MaxNet" training with tracking-sandwich assignment).

The server holds one supernet (``model.name = "elastic_mlp" | "elastic_resnet"``, see
:mod:`hpcfed.models.elastic`). Each round, of the K sampled clients:

1. the one that has held the largest subnet least often gets the largest subnet; of the rest,
   the one that has held the smallest least often gets the smallest ("tracking sandwich"; ties:
   the lowest client id); every other client gets a random subnet (one uniform draw per elastic
   choice, generator of (seed, round, client)). The per-client counters ``largest``/``smallest``
   live in the replicated server state, so every rank assigns alike and checkpoints keep them
   (``largest_clients = k``: the k that held it least, the authors' ``top_k``);
2. a client receives only its subnet's slices of the supernet (a prefix of every tensor), trains
   that small model and sends its change back through the ``[compress]`` uplink codec;
3. role shares: the largest-subnet client ``β_t``, every other ``(1 − k·β_t)/(K − k)``, with
   ``β_t = β0·[(1 − a)·½(1 + cos(π·min(t, T)/T)) + a]``, ``a = β_end/β0``, ``T = decay_fraction ×
   rounds`` (MaxNet: the largest subnet dominates early, then the family shares evenly); a
   client's weight is its share times its sample count (``weighting = "samples"``) or the share
   alone (``"maxnet"``, the paper);
4. each supernet element becomes the weighted average over the clients whose subnet covers it;
   elements nobody covered keep their value. Clients add ``w·θ_c`` and ``w`` at their subnet's
   positions (per-element weights) and the round's one Allreduce sums them.
   (``average = "cohort"``: clients whose subnet lacks an element count as leaving it unchanged.)

Opt-in, in-place distillation (``distill = λ``, the authors' ``kd_ratio``): a client trains on
``(1 − λ)·CE(labels) + λ·CE(teacher's softmax)``, the teacher being the global model of the
round's start: its largest subnet (OFA/BigNAS; the client then downloads the whole supernet,
counted in ``bytes_down``) or the client's own subnet as received.

Defaults (issue 19, measured in docs/superfed.md on digits, 100 rounds, IID and Dirichlet 0.5 and
0.1, 3 seeds, the job's and hpcfed's default training keys): ``beta0`` unset (``β = β_end = 1/K``
from the start: no MaxNet phase) and ``weighting = "samples"``: every cell of that sweep ends
closer to each subnet trained alone than the paper's MaxNet (0.9 → 1/K over 80 % of the rounds,
role shares alone), which leaves the supernet one client's model for the early rounds (under label
skew a model of a few classes) and the small subnets barely trained until the decay ends.
Distillation and the cohort average measured worse; they stay opt-in. The paper's reading:
``beta0 = 0.9``, ``weighting = "maxnet"``.

Every ``eval_every`` rounds the family (``[superfed] eval_subnets``; default smallest, two middle,
largest) is evaluated into ``family/`` of ``log.h5``; ``test_accuracy`` is the largest subnet's.

Where we differ from the paper and the authors' code (gatech-sysml/superfednas):

* Transport: SPMD with a replicated server and one Allreduce per round, not a message bus of
  pickled sends polled by threads; subnets are real small models, not masked supernets.
* The defaults above (no MaxNet phase, sample-weighted), where the paper's CIFAR-10 runs use
  MaxNet with role shares alone (the authors' code has sample weighting as ``--weight_dataset``,
  used in their Shakespeare runs; their distillation teacher is a separately trained supernet
  checkpoint, ours the global model of the round's start).
* Bytes are the encoded messages: downlink = the slices (float32) plus the spec as JSON text
  (what the client needs to build its model); uplink = the encoded change of the slices.
* ``T`` follows ``rounds``: extending a run on resume stretches the schedule from then on.
* Models: hpcfed's MLP and BasicBlock ResNet made elastic (no BatchNorm), not OFA's networks.

Logged per round: ``sub_params`` and ``sub_macs`` (means over the cohort; MACs of one forward pass
of one sample) and ``train_macs``, the round's training compute, counted as 3 × forward MACs per
sample and epoch (forward, plus a backward pass of about twice the forward's cost).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from hpcfed.algorithms.base import Strategy, Update, weighted_mean
from hpcfed.algorithms.compression import Compression, require_plain_uplink
from hpcfed.algorithms.slices import contribution, train_slices
from hpcfed.codecs import IdentityCodec
from hpcfed.config import UserError
from hpcfed.models.elastic import Subnet, elastic_space, make_subnet, spec_text
from hpcfed.rng import cohort, numpy_generator
from hpcfed.train import LocalSGD, evaluate_sums

CACHE = 64  # built client subnets kept per rank (an ResNet space has far more specs than this)


def maxnet_beta(t: int, rounds: int, beta0: float, beta_end: float, decay_fraction: float) -> float:
    """The largest subnet's weight in round ``t``: cosine from β0 at t = 0 to β_end at t ≥ T."""
    T = max(1, round(decay_fraction * rounds))
    a = beta_end / beta0
    return beta0 * ((1 - a) * 0.5 * (1 + math.cos(math.pi * min(t, T) / T)) + a)


def sandwich(
    clients: np.ndarray, largest: np.ndarray, smallest: np.ndarray, n_largest: int = 1
) -> tuple[list[int], int | None]:
    """(the ``n_largest`` clients that get the largest subnet, the one that gets the smallest or
    None): those that held it the fewest times so far, ties to the lowest id."""
    clients = np.asarray(clients)
    order = clients[np.lexsort((clients, largest[clients]))]  # by count, then id
    big = [int(c) for c in order[:n_largest]]
    rest = clients[~np.isin(clients, big)]
    return big, (int(rest[np.lexsort((rest, smallest[rest]))[0]]) if rest.size else None)


def client_weight(share: float, samples: float, weighting: str) -> float:
    """A client's aggregation weight: its role share (β or (1 − β)/(K − 1)), times its sample
    count under ``weighting = "samples"`` (FedAvg's n_c; "maxnet" ignores sample counts)."""
    return share * samples if weighting == "samples" else share


def cohort_contribution(old: np.ndarray, index: np.ndarray, theta: np.ndarray, w: float) -> Update:
    """``average = "cohort"``: one client's part of the round over the whole supernet: ``w·θ`` at
    its subnet's positions, ``w·θ_old`` (no change) everywhere else, and weight ``w`` everywhere."""
    value = w * np.asarray(old, dtype=np.float64)
    value[index] = w * np.asarray(theta, dtype=np.float64)
    return Update(value=value, weight=np.full(old.size, float(w)))


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``−Σ_k p_k log softmax(logits)_k``: cross-entropy against soft targets."""
    return -(probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def distill_loss(base, share: float):
    """The loss of a distilling client: ``(1 − λ)·base(outputs, labels) + λ·soft CE(outputs, p)``
    (the authors' ``kd_ratio`` form). Targets come packed as ``[label, p_1, …, p_C]`` per row, so
    the shared training loop indexes labels and teacher predictions with the same minibatch."""

    def loss(outputs: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        labels = packed[:, 0].long()
        return (1 - share) * base(outputs, labels) + share * soft_cross_entropy(outputs, packed[:, 1:])

    return loss


class Distilling:
    """A client's trainer with the teacher's soft predictions beside its labels: the teacher
    (a module holding the global weights of the round's start) predicts the client's samples once,
    before training; then plain local SGD runs on the packed targets with :func:`distill_loss`."""

    def __init__(self, trainer: LocalSGD, share: float, teacher: torch.nn.Module):
        self.trainer, self.teacher = trainer, teacher
        trainer.loss = distill_loss(trainer.loss, share)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        probs = F.softmax(self.teacher(x), dim=1)
        return torch.cat([y.to(probs.dtype).unsqueeze(1), probs], dim=1)

    def train(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        return self.trainer.train(x, self.targets(x, y), generator)


class SuperFed(Strategy):
    name = "superfed"
    per_element_weights = True
    extra_metrics = ("sub_params", "sub_macs", "train_macs")

    @classmethod
    def check_job(cls, job) -> None:
        """k largest-subnet clients take k·β of the round's weight: at most all of it, at any round."""
        super().check_job(job)
        cfg, K = job.superfed, job.clients_per_round
        k = cfg.largest_clients
        if k == 1:
            return
        if k > K:
            raise UserError(f"superfed.largest_clients: {k} is more than clients_per_round ({K})")
        for key, beta in (
            ("beta0", cfg.beta0),
            ("beta_end", cfg.beta_end if cfg.beta_end is not None else 1 / K),
        ):
            if beta is not None and k * beta > 1 + 1e-12:
                raise UserError(
                    f"superfed.largest_clients: {k} clients x {key} {beta:g} exceed the round's weight 1"
                )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg = self.job.superfed
        require_plain_uplink(self.job.compress, "superfed", "each client's slices are its own subnet")
        self.space = elastic_space(self.job.model, cfg)
        self.input_shape, self.classes = tuple(self.data.input_shape), self.data.num_classes
        self.beta_end = cfg.beta_end if cfg.beta_end is not None else 1.0 / self.job.clients_per_round
        self.beta0 = cfg.beta0 if cfg.beta0 is not None else self.beta_end  # None: no MaxNet phase
        given = cfg.eval_subnets
        self.eval_specs = (
            [self.space.resolve(v, f"superfed.eval_subnets[{i}]") for i, v in enumerate(given)]
            if given
            else self.space.ladder(4)
        )
        self.codec = IdentityCodec()
        self.compression = Compression(self.job.compress, self.job.seed, self.data.num_clients)
        self._subnets: OrderedDict[str, tuple[Subnet, LocalSGD]] = OrderedDict()
        self._eval: list[Subnet] = []
        self._teacher: Subnet | None = None
        self._plan_round: int | None = None
        self._plan: dict[int, tuple[dict, float]] = {}
        self._roles: tuple[list[int], int | None] = ([], None)

    # -- replicated server side ----------------------------------------------------------------
    def init_state(self):
        state = super().init_state()
        n = self.data.num_clients
        state["largest"] = np.zeros(n, dtype=np.int64)  # rounds each client held the largest subnet
        state["smallest"] = np.zeros(n, dtype=np.int64)
        return state

    def beta(self, round_index: int) -> float:
        cfg = self.cfg
        return maxnet_beta(round_index, self.job.rounds, self.beta0, self.beta_end, cfg.decay_fraction)

    def plan(self, state, round_index: int) -> None:
        """Every cohort member's (subnet spec, aggregation weight) this round; the same on every rank."""
        clients = cohort(self.job.seed, round_index, self.data.num_clients, self.job.clients_per_round)
        big, small = sandwich(clients, state["largest"], state["smallest"], self.cfg.largest_clients)
        others = len(clients) - len(big)
        beta = self.beta(round_index) if others else 1.0 / len(big)
        other = (1.0 - len(big) * beta) / max(others, 1)
        plan = {}
        for c in clients.tolist():
            if c in big:
                plan[c] = (self.space.largest(), beta)
            elif c == small:
                plan[c] = (self.space.smallest(), other)
            else:
                rng = numpy_generator(self.job.seed, "superfed-subnet", round_index, c)
                plan[c] = (self.space.sample(rng), other)
        self._plan, self._roles, self._plan_round = plan, (big, small), round_index
        if self.cfg.distill > 0 and self.cfg.teacher == "largest":
            # every client of the round gets the whole supernet (its slices are in it) to run the
            # teacher, the largest subnet of the round's start: set and measured once a round
            self.teacher.flat.set(state["model"][self.teacher.index])
            self._whole_down = len(self.codec.encode(state["model"], {})[0])

    def begin_round(self, state, round_index):
        self.plan(state, round_index)

    def server_update(self, state, total: Update, round_index):
        if self._plan_round != round_index:
            self.plan(state, round_index)
        big, small = self._roles
        state["largest"] = state["largest"].copy()
        state["largest"][big] += 1  # (distinct clients: one count each)
        if small is not None:
            state["smallest"] = state["smallest"].copy()
            state["smallest"][small] += 1
        state["model"] = weighted_mean(total, state["model"]).astype(np.float32)
        return state

    # -- per client ------------------------------------------------------------------------------
    def subnet(self, spec: dict) -> tuple[Subnet, LocalSGD]:
        key = spec_text(spec)
        if key in self._subnets:
            self._subnets.move_to_end(key)
        else:
            sub = make_subnet(self.space, spec, self.flat, self.input_shape, self.classes)
            trainer = LocalSGD(sub.module, self.job.train)
            if self.cfg.distill > 0:  # "subnet": the module itself, as received, predicts first
                teacher = self.teacher.module if self.cfg.teacher == "largest" else sub.module
                trainer = Distilling(trainer, self.cfg.distill, teacher)
            self._subnets[key] = (sub, trainer)
            if len(self._subnets) > CACHE:
                self._subnets.popitem(last=False)
        return self._subnets[key]

    @property
    def teacher(self) -> Subnet:
        """The largest subnet's model, the teacher of ``superfed.teacher = "largest"``."""
        if self._teacher is None:
            self._teacher = make_subnet(
                self.space, self.space.largest(), self.flat, self.input_shape, self.classes
            )
        return self._teacher

    def client_update(self, state, client_id, round_index) -> Update:
        if self._plan_round != round_index:
            self.plan(state, round_index)
        spec, w = self._plan[client_id]
        sub, trainer = self.subnet(spec)
        whole = self.cfg.distill > 0 and self.cfg.teacher == "largest"  # (set up in plan)
        # down: the subnet's slices, and its spec so the client can build the model; up: their change
        r = train_slices(self, sub.flat, trainer, state["model"][sub.index], client_id, round_index)
        n, k = r.samples, float(self.job.clients_per_round)
        w = client_weight(w, n, self.cfg.weighting)
        if self.cfg.average == "cohort":
            update = cohort_contribution(state["model"], sub.index, r.theta, w)
        else:
            update = contribution(self.flat.size, sub.index, r.theta, w)
        down = self._whole_down if whole else len(r.down)
        teacher_macs = (self.teacher.macs if whole else sub.macs) * n if self.cfg.distill > 0 else 0.0
        update.metrics = {
            "loss_sum": r.loss * n,
            "samples": n,
            "bytes_up": len(r.up),
            "bytes_down": down + len(spec_text(spec).encode()),
            "sub_params": sub.params / k,
            "sub_macs": sub.macs / k,
            # training: forward + backward (~3 forward passes) per sample and epoch, and one
            # forward pass of the teacher per sample when distilling
            "train_macs": 3.0 * sub.macs * n * self.job.train.epochs + teacher_macs,
        }
        return update

    # -- the family in log.h5 -------------------------------------------------------------------
    def eval_subnets(self) -> list[Subnet]:
        if not self._eval:
            self._eval = [
                make_subnet(self.space, s, self.flat, self.input_shape, self.classes) for s in self.eval_specs
            ]
        return self._eval

    def log_groups(self) -> dict[str, dict]:
        shape, classes = self.input_shape, self.classes
        return {
            "family": {
                "subnets": json.dumps(self.eval_specs),
                "macs": np.array([self.space.macs(s, shape, classes) for s in self.eval_specs], np.int64),
                "params": np.array([self.space.params(s, shape, classes) for s in self.eval_specs], np.int64),
            }
        }

    def eval_sums(self, state, x, y) -> np.ndarray:
        sums = []
        for sub in self.eval_subnets():
            sub.flat.set(state["model"][sub.index])
            sums.extend(evaluate_sums(sub.module, x, y))
        return np.array(sums, dtype=np.float64)

    def eval_rows(self, sums: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        s = sums.reshape(-1, 3)  # (correct, loss sum, count) per subnet
        count = np.maximum(s[:, 2], 1.0)
        return {"family": {"accuracy": s[:, 0] / count, "loss": s[:, 1] / count}}
