"""PriSM, principal sub-models (Niu et al., "Overcoming Resource Constraints in Federated
Learning: Large Models Can Be Trained with only Weak Clients", arXiv 2208.13141, TMLR 2023).

Each decomposable layer (k×k convolutions with more than 3 input channels; with ``layers = "all"``
also the hidden linear layers) is factorised by SVD, ``W = U diag(s) Vᵀ = A B`` (see
:mod:`hpcfed.models.factorized`). Every round, each client with keep ratio ρ samples ⌈ρ·r⌉ of a
layer's r principal kernels without replacement with ``p_i ∝ s_i^γ`` (generator of (seed, round,
client)), receives those slices of A and B and the non-factorised tensors, trains the compact
low-rank sub-model and sends its slices back. The server averages each kernel over the clients
that sampled it (per-element weights, sample-weighted, in the round's one Allreduce), keeps the
kernels nobody sampled, averages the non-factorised tensors as FedAvg does, recomposes ``W = A B``
and re-decomposes it at the next round.

``sampling``: ``"principal"`` (the paper), ``"uniform"`` and ``"top"`` (the first ⌈ρ·r⌉ kernels;
the paper's ablations), and ``"channels"``, the baseline the paper compares with: no
factorisation, every hidden width cut to its first ⌈ρ·C⌉ channels (HeteroFL, Diao et al. 2021).

Where we differ from the paper and the authors' code (yuehniu/modeldecomp-fl):

* Slices, not masks: the client's model really is smaller (parameters, MACs, activations, bytes).
* The server state is W (the model's flat vector, so checkpoints load into the plain model); the
  factors are a deterministic function of it (float64 SVD, signs fixed), recomputed every round,
  which is the algorithm's "recompose and re-decompose" step. The Allreduce buffer is in factor
  space (A and B of every factorised layer plus the other tensors).
* Singular values are folded into both factors (``A = U√s``, ``B = √s Vᵀ``) and trained, as in
  the authors' v2 layers; their Frobenius decay is plain ``train.weight_decay`` on A and B here.
* p_i is floored at 1e-12 of the largest so that sampling without replacement never runs out.
* ``out_keep < 1`` (low-rank activations): the 1×1 "U" layer computes only the first
  ⌈out_keep·C⌉ output channels; the rest are zero (then the bias), as in the authors' masks. The
  zeros are materialised so that norms and residuals downstream keep their width: U's parameters,
  bytes and MACs shrink, the following activations do not.
* Heterogeneous clients: with a list ``keep``, each client's level is drawn once from
  ``keep_probs`` by (seed, client): a weak device stays weak.
* The client sends its change to the slices through the ``[compress]`` uplink codec (error
  feedback and downlink compression are refused: the slices change every round). The downlink
  is the client's slices (float32) plus its kernel indices (int32), encoded.
* The channels baseline has no HeteroFL "scaler" and no static BN.

Per client the sub-model's parameters, MACs (one forward pass of one sample) and measured peak
training memory (one SGD step on a batch: parameters, gradients, momentum, activations; torch's
profiler, once per keep level) are logged as the round's means ``sub_params``, ``sub_macs``,
``sub_peak_memory`` (bytes).
"""

from __future__ import annotations

import numpy as np

from hpcfed.algorithms.base import Strategy, Update, weighted_mean
from hpcfed.algorithms.compression import Compression, require_plain_uplink
from hpcfed.algorithms.slices import contribution, train_slices
from hpcfed.codecs import IdentityCodec
from hpcfed.config import UserError
from hpcfed.models.factorized import (
    FactorSpace,
    channel_submodel,
    count_macs,
    decomposable,
    kept,
    peak_training_bytes,
    prism_submodel,
)
from hpcfed.rng import numpy_generator
from hpcfed.train import LocalSGD

P_FLOOR = 1e-12


def kernel_probabilities(s: np.ndarray, gamma: float) -> np.ndarray:
    """``p_i ∝ s_i^γ`` (s scaled by its largest value first, floored at 1e-12), summing to 1."""
    s = np.asarray(s, dtype=np.float64)
    top = s.max() if s.size else 0.0
    p = np.ones_like(s) if top <= 0 else np.maximum((s / top) ** gamma, P_FLOOR)
    return p / p.sum()


def sample_kernels(
    rng: np.random.Generator, s: np.ndarray, n: int, sampling: str, gamma: float
) -> np.ndarray:
    """Sorted indices of the ``n`` kernels (of ``len(s)``, s descending) a client trains."""
    r = len(s)
    if sampling == "top" or n >= r:
        return np.arange(n)
    if sampling == "uniform":
        return np.sort(rng.choice(r, size=n, replace=False))
    return np.sort(rng.choice(r, size=n, replace=False, p=kernel_probabilities(s, gamma)))


class Prism(Strategy):
    name = "prism"
    per_element_weights = True
    extra_metrics = ("sub_params", "sub_macs", "sub_peak_memory")  # means over the round's clients

    @classmethod
    def check_job(cls, job) -> None:
        super().check_job(job)
        # its sub-models are sliced convolutions and linear layers of image classifiers, profiled
        # on float images: sequence models (embeddings, LSTMs, attention) have no such kernels
        if job.model.name in ("char_lstm", "char_transformer"):
            raise UserError(
                f"model.name = {job.model.name!r}: algorithm 'prism' takes image models (mlp, cnn, resnet8, "
                "resnet18, or your own of Conv2d/Linear layers), not sequence models"
            )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, comp = self.job.prism, self.job.compress
        require_plain_uplink(comp, "prism", "each round's slices are different kernels")
        self.cfg = cfg
        names = [] if cfg.sampling == "channels" else decomposable(self.flat.module, cfg.layers)
        self.space = FactorSpace(self.flat, names)
        self.levels = list(cfg.keep) if isinstance(cfg.keep, list) else [cfg.keep]
        probs = cfg.keep_probs or [1.0 / len(self.levels)] * len(self.levels)
        self.level_probs = np.asarray(probs, dtype=np.float64) / np.sum(probs)
        self.codec = IdentityCodec()
        self.compression = Compression(comp, self.job.seed, self.job.data.num_clients)
        self._subs: dict[int, tuple] = {}  # keep level -> (SubModel, LocalSGD, MACs, peak bytes)
        self._round: int | None = None  # the round the cached factors belong to
        self._factors = np.zeros(0)
        self._svals: list[np.ndarray] = []

    def layout(self) -> dict[str, int]:
        sizes = super().layout()
        sizes["value"] = sizes["weight"] = self.space.size  # the Allreduce is in factor space
        return sizes

    # -- replicated server side ----------------------------------------------------------------
    def prepare(self, state, round_index: int) -> None:
        """Decompose the global model (every rank, the same bits)."""
        if not np.isfinite(state["model"]).all():  # every rank sees it: all stop together
            raise UserError(
                f"prism: the global model holds NaN/inf before round {round_index + 1} "
                "(training diverged; lower train.lr or train.momentum)"
            )
        self._factors, self._svals = self.space.decompose(state["model"])
        self._round = round_index

    def begin_round(self, state, round_index):
        self.prepare(state, round_index)

    def server_update(self, state, total: Update, round_index):
        if self._round != round_index:
            self.prepare(state, round_index)
        # each kernel's average over the clients that trained it; untouched kernels kept
        factors = weighted_mean(total, self._factors)
        state["model"] = self.space.recompose(factors)
        self._round = None  # the cached factors describe the old model now
        return state

    # -- per client ------------------------------------------------------------------------------
    def level_of(self, client_id: int) -> int:
        if len(self.levels) == 1:
            return 0
        rng = numpy_generator(self.job.seed, "prism-keep", client_id)
        return int(rng.choice(len(self.levels), p=self.level_probs))

    def submodel(self, level: int):
        if level not in self._subs:
            keep, module = self.levels[level], self.flat.module
            if self.cfg.sampling == "channels":
                sub = channel_submodel(module, self.space, keep, self.cfg.layers)
            else:
                sub = prism_submodel(module, self.space, keep, self.cfg.out_keep)
            shape, t = tuple(self.data.input_shape), self.job.train
            macs = count_macs(sub.module, shape)
            peak = peak_training_bytes(sub.module, shape, self.data.num_classes, t.batch_size, t.momentum)
            self._subs[level] = (sub, LocalSGD(sub.module, t), macs, peak)
        return self._subs[level]

    def select(self, round_index: int, client_id: int, keep: float) -> list[np.ndarray]:
        """The kernels client ``client_id`` trains this round, per factorised layer."""
        rng = numpy_generator(self.job.seed, "prism", round_index, client_id)
        return [
            sample_kernels(rng, s, kept(keep, L.rank), self.cfg.sampling, self.cfg.gamma)
            for L, s in zip(self.space.layers, self._svals)
        ]

    def client_update(self, state, client_id, round_index) -> Update:
        if self._round != round_index:
            self.prepare(state, round_index)
        level = self.level_of(client_id)
        sub, trainer, macs, peak = self.submodel(level)
        kernels = self.select(round_index, client_id, self.levels[level])
        idx = sub.index(kernels)
        # down: the slices (and which kernels they are, 4 bytes an index); up: their change
        r = train_slices(self, sub.flat, trainer, self._factors[idx], client_id, round_index)
        update = contribution(self.space.size, idx, r.theta, r.samples)  # sample-weighted
        n, k = r.samples, float(self.job.clients_per_round)
        down_len = len(r.down) + sum(4 * len(kern) for kern in kernels)
        update.metrics = {"loss_sum": r.loss * n, "samples": n, "bytes_up": len(r.up), "bytes_down": down_len}
        update.metrics.update(sub_params=sub.params / k, sub_macs=macs / k, sub_peak_memory=peak / k)
        return update
