"""HADFL: heterogeneity-aware decentralized FL (Cao et al., DAC 2021, arXiv 2111.08274), our reading.

No server holds a model: the job's clients are *devices* with speeds ``v_i`` (SGD steps per
simulated second), each owning its model on a fixed home rank (device d on rank d mod size). Runs
are cycles on a simulated clock (``rounds`` = cycles):

- ``hadfl``: a cycle lasts ``T = max_i τ_i / v_i`` with ``τ_i = max(1, round(τ_max·v_i/v_max))``, so
  every device does its τ_i steps and nobody waits for stragglers (T = τ_max/v_max up to
  rounding). Then a share of the devices is picked with inclusion probability ∝ ``1+s_i``
  (``s_i``: cycles since it last averaged; picked for sure once ``s_i >= max_staleness``), the
  picked devices are paired at random, and each pair averages its two models weighted by data.
  Unpicked devices carry on from their own models. Optionally (``full_average_every = K``) every
  K-th cycle ends in a full data-weighted average instead of pairs.
- ``dfedavg`` (decentralized FedAvg): everyone does τ steps, then a full data-weighted average;
  the cycle lasts ``τ / v_min``.
- ``sync`` (data-parallel SGD): τ steps per cycle, each step one all-reduce at the slowest pace
  (``1 / v_min``). Every device takes one plain SGD step from the shared model and the models are
  averaged, which for plain SGD (weight decay included) equals averaging the gradients: exact,
  and the same code as the others. With momentum it would not be, so ``sync`` refuses it.

Where we differ from the paper (no public code): the paper's reading, selection ∝ ``τ_i·(1+s_i)``
and pair weights data × steps, is kept by key (``hadfl.selection = "steps_staleness"``,
``hadfl.pair_weight = "data_steps"``) but is not the default. Data × steps weights move the
evaluated data-weighted mean toward the fastest device at every average it joins, and with
τ-weighted selection it joins nearly all of them; under label skew the model drifts to that
device's label mix, and HADFL lost its lead over D-FedAvg (docs/hadfl.md, "Label skew": on the
tuned job's Dirichlet(0.5) splits 1.5x or more on 2 of 5 seeds with the paper's reading, on 5 of
5 with the defaults; IID 2.5-3.2x instead of 2.9-5.3x). Selection uses exact inclusion
probabilities (systematic sampling, capped at 1) rather than an unspecified sampler; an even
number of devices is picked so that all pair up; communication time is NOT on the clock (compute
only, which flatters ``sync``, the most talkative schedule); the paper's real-time mode is not
built. Bytes are what crosses between devices: each paired device sends its float32 model once
(``hadfl``); a full average costs what a ring all-reduce of the model among N devices sends,
``2(N-1)·4P`` bytes (``dfedavg`` once per cycle, ``sync`` once per step, ``full_average_every``
cycles once each). The loop itself is :mod:`hpcfed.peer`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hpcfed.algorithms.base import BASE_METRICS, Strategy
from hpcfed.comm import allreduce_sum
from hpcfed.config import UserError
from hpcfed.rng import numpy_generator, torch_generator
from hpcfed.train import LocalSGD

PROBE_STEPS = 5  # speeds = "measured": timed steps per device (after one untimed warm-up step)


# --------------------------------------------------------------------------- the maths (pure)


def local_steps(speeds: np.ndarray, tau_max: int) -> np.ndarray:
    """τ_i = max(1, round(τ_max · v_i / v_max)), rounding halves up."""
    v = np.asarray(speeds, dtype=np.float64)
    return np.maximum(1, np.floor(tau_max * v / v.max() + 0.5)).astype(np.int64)


def selection_probabilities(tau: np.ndarray, staleness: np.ndarray, by: str) -> np.ndarray:
    """p_i ∝ 1 + s_i (``by = "staleness"``, the default: speed-blind, so slow devices average as
    often as fast ones) or p_i ∝ τ_i · (1 + s_i) (``"steps_staleness"``, the paper's reading:
    fresh progress and staleness both raise a device's chance; the fastest device is then capped
    at π = 1 and pairs every cycle)."""
    w = 1.0 + np.asarray(staleness, dtype=np.float64)
    if by == "steps_staleness":
        w = np.asarray(tau, dtype=np.float64) * w
    return w / w.sum()


def inclusion_probabilities(p: np.ndarray, k: int, forced: np.ndarray) -> np.ndarray:
    """π_i with Σπ = k: 1 for forced devices, the rest ∝ p_i capped at 1 (the excess of a capped
    device goes to the others), so a sample of k devices includes device i with probability π_i."""
    pi = np.where(forced, 1.0, 0.0)
    fixed = forced.copy()
    while True:
        free = ~fixed
        pi[free] = (k - fixed.sum()) * p[free] / p[free].sum()
        over = free & (pi >= 1.0)
        if not over.any():
            return pi
        fixed |= over
        pi[over] = 1.0


def systematic_sample(rng: np.random.Generator, pi: np.ndarray) -> np.ndarray:
    """Madow's systematic sampling over a random order: device i is picked with probability
    exactly π_i (each π_i <= 1), and exactly Σπ devices are picked. Returns sorted ids."""
    order = rng.permutation(len(pi))
    cum = np.concatenate([[0.0], np.cumsum(pi[order])])
    k = int(round(cum[-1]))
    idx = np.searchsorted(cum, rng.random() + np.arange(k), side="right") - 1
    return np.sort(order[np.minimum(idx, len(pi) - 1)])  # minimum: cum[-1] may round below k


def select(rng, tau, staleness, fraction: float, max_staleness: int, by: str) -> np.ndarray:
    """The cycle's picked devices: an even k = 2·round(fraction·N/2) (at least 2), every device
    with ``s_i >= max_staleness`` among them (more than k if that many are overdue)."""
    n = len(tau)
    k = min(n - n % 2, max(2, 2 * int(np.floor(fraction * n / 2 + 0.5))))
    forced = np.asarray(staleness) >= max_staleness
    if forced.sum() >= k:
        return np.flatnonzero(forced)
    p = selection_probabilities(tau, staleness, by)
    return systematic_sample(rng, inclusion_probabilities(p, k, forced))


def pairing(rng: np.random.Generator, selected: np.ndarray) -> list[tuple[int, int]]:
    """Random disjoint pairs of the selected devices, each as (lower id, higher id); an odd one
    out (only when more devices are overdue than picked) waits for the next cycle."""
    perm = rng.permutation(np.asarray(selected))
    pairs = [tuple(sorted((int(perm[i]), int(perm[i + 1])))) for i in range(0, len(perm) - 1, 2)]
    return sorted(pairs)


def pair_weights(sizes: np.ndarray, tau: np.ndarray, kind: str) -> np.ndarray:
    """Each device's weight in the pair averages it joins: samples (``"data"``, the default) or
    samples × τ_i (``"data_steps"``, the paper's reading). Only ``"data"`` keeps Σ_i n_i x_i, the
    data-weighted mean of the device models (the evaluated model), unchanged by a pair average:
    with n·τ weights each average moves that mean toward the faster device of the pair, and
    under label skew toward its label mix (docs/hadfl.md, "Label skew")."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return sizes * np.asarray(tau, dtype=np.float64) if kind == "data_steps" else sizes


def device_lrs(lr: float, tau: np.ndarray, kind: str) -> np.ndarray:
    """Each device's SGD step size: ``lr`` for all (``"same"``) or ``lr·τ_min/τ_i``
    (``"per_cycle"``: every device moves its model by the same step budget per cycle)."""
    tau = np.asarray(tau, dtype=np.float64)
    return np.full(tau.shape, float(lr)) if kind == "same" else float(lr) * tau.min() / tau


def pair_average(models: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ w_j x_j / Σ w_j in float64, as float32. Both ends of a pair call it with the same
    arguments in the same order (lower id first), so both get the same bits."""
    total = np.zeros(models[0].shape, dtype=np.float64)
    for x, w in zip(models, weights):
        total += float(w) * x.astype(np.float64)
    return (total / float(sum(weights))).astype(np.float32)


def ring_allreduce_bytes(num_devices: int, message_bytes: int) -> int:
    """What a ring all-reduce of one message among N devices sends in total: 2(N-1) chunks of
    1/N of it per device (reduce-scatter, then all-gather)."""
    return 2 * (num_devices - 1) * message_bytes


def resolve_speeds(spec: list[float] | str, num_devices: int, seed: int) -> np.ndarray | None:
    """Speeds from the job: a list cycled over devices, or log-normal(0, σ) drawn from the seed;
    None for "measured" (timed at start-up by the strategy)."""
    if isinstance(spec, list):
        return np.resize(np.asarray(spec, dtype=np.float64), num_devices)
    if spec.startswith("lognormal:"):
        sigma = float(spec.partition(":")[2])
        return numpy_generator(seed, "hadfl-speeds").lognormal(0.0, sigma, num_devices)
    return None


def cycle_time(schedule: str, speeds: np.ndarray, tau_max: int) -> float:
    """Simulated seconds of one cycle: compute only (communication is not on the clock)."""
    if schedule == "hadfl":
        return float(np.max(local_steps(speeds, tau_max) / speeds))
    return tau_max / float(np.min(speeds))  # dfedavg: τ steps; sync: τ all-reduced steps


# --------------------------------------------------------------------------- the strategy


class HADFL(Strategy):
    """Devices own their models (``self.models``, this rank's only); the replicated state holds
    the clock, staleness, speeds and the last averaged model (what is evaluated and checkpointed)."""

    name = "hadfl"
    decentralized = True  # Run.loop hands over to hpcfed.peer.peer_loop
    uses_cohort = False  # every device trains each cycle (hadfl.select_fraction picks pairs)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        job, cfg = self.job, self.job.hadfl
        if job.data.num_clients < 2:
            raise UserError("data.num_clients: algorithm 'hadfl' needs at least 2 devices to pair")
        if job.compress.active:
            raise UserError("[compress] does not apply to algorithm 'hadfl' (peers swap whole models)")
        if getattr(getattr(job, "faults", None), "active", False):
            raise UserError("[faults] does not apply to algorithm 'hadfl' (its loop is hpcfed.peer)")
        if cfg.schedule == "sync" and job.train.momentum > 0:
            raise UserError("hadfl.schedule 'sync' needs train.momentum = 0 (it averages single SGD steps)")
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.n = job.data.num_clients
        self.sizes = np.asarray(self.data.client_sizes, dtype=np.float64)
        self.mine = [d for d in range(self.n) if d % self.size == self.rank]
        self.trainer = LocalSGD(self.flat.module, job.train)
        self.models: dict[int, np.ndarray] = {}

    @property
    def placement(self) -> str:
        return "fixed"

    def owner(self, device: int) -> int:
        return device % self.size

    def init_state(self):
        model = self.flat.get()
        self.models = {d: model.copy() for d in self.mine}
        speeds = resolve_speeds(self.job.hadfl.speeds, self.n, self.job.seed)
        if speeds is None:
            speeds = self._measure_speeds(model)
        return {
            "model": model,
            "sim_time": np.zeros(1),
            "staleness": np.zeros(self.n, dtype=np.int64),
            "speeds": speeds,
        }

    def layout(self):
        sizes = {m: 1 for m in BASE_METRICS}
        if self.job.hadfl.schedule == "hadfl":
            # pairs swap point to point: the cycle's collective carries metric sums only (a
            # full_average_every cycle adds its own Allreduce of the model sum, average_model)
            return sizes
        return {"value": self.flat.size, "weight": 1, **sizes}

    def extra_state(self):
        return {f"device.{d}": m for d, m in self.models.items()}

    def load_extra_state(self, arrays):
        models = {int(k.rsplit(".", 1)[1]): v for k, v in arrays.items() if k.startswith("device.")}
        missing = [d for d in self.mine if d not in models]
        if missing:
            raise ValueError(f"hadfl checkpoint lacks device models {missing}")
        self.models = {d: np.asarray(models[d], dtype=np.float32).copy() for d in self.mine}

    def average_model(self) -> np.ndarray:
        """The data-weighted average of every device's model (one Allreduce; all ranks call it)."""
        buf = np.zeros(self.flat.size + 1)
        for d in self.mine:
            buf[:-1] += self.sizes[d] * self.models[d].astype(np.float64)
            buf[-1] += self.sizes[d]
        total = allreduce_sum(self.comm, buf)
        return (total[:-1] / total[-1]).astype(np.float32)

    # -- one cycle --------------------------------------------------------------------------------
    def run_cycle(self, state, rnd: int, packed, stop: bool) -> dict[str, np.ndarray]:
        """Train, exchange and average for cycle ``rnd``; advance the clock. Returns the summed
        metrics of the cycle's last Allreduce (which also carries the stop flag)."""
        cfg = self.job.hadfl
        schedule = {"hadfl": self._hadfl, "dfedavg": self._dfedavg, "sync": self._sync}[cfg.schedule]
        total = schedule(state, rnd, packed, stop)
        state["sim_time"] = state["sim_time"] + cycle_time(cfg.schedule, state["speeds"], cfg.local_steps)
        return total

    def _train_devices(self, rnd: int, tau: np.ndarray, lrs: np.ndarray | None = None) -> tuple[float, float]:
        loss_sum = samples = 0.0
        for d in self.mine:
            self.trainer.opt.lr = self.job.train.lr if lrs is None else float(lrs[d])
            self.flat.set(self.models[d])
            x, y = self.data.client(d)
            gen = torch_generator(self.job.seed, "train", rnd, d)
            loss, seen = self.trainer.train_steps(x.to(self.device), y.to(self.device), gen, int(tau[d]))
            self.models[d] = self.flat.get()
            loss_sum, samples = loss_sum + loss * seen, samples + seen
        self.trainer.opt.lr = self.job.train.lr
        return loss_sum, samples

    def _finish(self, packed, loss_sum, samples, sent, stop) -> dict[str, np.ndarray]:
        for name, value in (("loss_sum", loss_sum), ("samples", samples), ("bytes_up", sent)):
            packed.view(name)[0] = value
        packed.view("stop")[0] = 1.0 if stop else 0.0
        return packed.allreduce()

    def _hadfl(self, state, rnd, packed, stop):
        from hpcfed.peer import swap_models

        cfg = self.job.hadfl
        packed.zero()
        tau = local_steps(state["speeds"], cfg.local_steps)
        loss_sum, samples = self._train_devices(rnd, tau, device_lrs(self.job.train.lr, tau, cfg.lr_scale))
        if cfg.full_average_every and (rnd + 1) % cfg.full_average_every == 0:
            return self._full_average(state, packed, loss_sum, samples, stop)
        # every rank draws the same selection and pairs from (seed, round): no coordinator
        rng = numpy_generator(self.job.seed, "hadfl", rnd)
        chosen = select(rng, tau, state["staleness"], cfg.select_fraction, cfg.max_staleness, cfg.selection)
        pairs = pairing(rng, chosen)
        received = swap_models(self.comm, pairs, self.models, self.owner)
        weight = pair_weights(self.sizes, tau, cfg.pair_weight)
        averaged, sent = {}, 0
        for a, b in pairs:
            for me in (a, b):
                if me in self.models:
                    x_a, x_b = (self.models[a], received[a]) if me == a else (received[b], self.models[b])
                    averaged[me] = pair_average([x_a, x_b], [weight[a], weight[b]])
                    sent += self.models[me].nbytes
        self.models.update(averaged)
        synced = np.zeros(self.n, dtype=bool)
        synced[[d for pair in pairs for d in pair]] = True
        state["staleness"] = np.where(synced, 0, state["staleness"] + 1)
        return self._finish(packed, loss_sum, samples, sent, stop)

    def _full_average(self, state, packed, loss_sum, samples, stop):
        """HADFL's periodic wider average (``full_average_every``): every device takes the
        data-weighted mean of all device models, as a ``dfedavg`` cycle ends; nobody is stale.
        Its own Allreduce, so that the other cycles' collective stays metric-sized."""
        mean = self.average_model()
        for d in self.mine:
            self.models[d] = mean.copy()
        state["staleness"] = np.zeros_like(state["staleness"])
        sent = ring_allreduce_bytes(self.n, 4 * self.flat.size) if self.rank == 0 else 0
        return self._finish(packed, loss_sum, samples, sent, stop)

    def _dfedavg(self, state, rnd, packed, stop):
        tau = self.job.hadfl.local_steps
        packed.zero()
        loss_sum, samples = self._train_devices(rnd, np.full(self.n, tau))
        self._add_models(packed, self.sizes * tau)
        sent = ring_allreduce_bytes(self.n, 4 * self.flat.size) if self.rank == 0 else 0
        total = self._finish(packed, loss_sum, samples, sent, stop)
        self._set_all(total)
        return total

    def _sync(self, state, rnd, packed, stop):
        steps = self.job.hadfl.local_steps
        loss_sum = samples = 0.0
        for k in range(steps):
            packed.zero()
            for d in self.mine:  # one step each from the shared model (all device models are equal)
                self.flat.set(self.models[d])
                x, y = self.data.client(d)
                gen = torch_generator(self.job.seed, "train", rnd, d, k)
                loss, seen = self.trainer.train_steps(x.to(self.device), y.to(self.device), gen, 1)
                packed.view("value")[:] += self.sizes[d] * self.flat.get().astype(np.float64)
                packed.view("weight")[0] += self.sizes[d]
                loss_sum, samples = loss_sum + loss * seen, samples + seen
            if k < steps - 1:
                self._set_all(packed.allreduce())
        sent = steps * ring_allreduce_bytes(self.n, 4 * self.flat.size) if self.rank == 0 else 0
        total = self._finish(packed, loss_sum, samples, sent, stop)
        self._set_all(total)
        return total

    def _add_models(self, packed, weight: np.ndarray) -> None:
        value = packed.view("value")
        for d in self.mine:
            value += weight[d] * self.models[d].astype(np.float64)
            packed.view("weight")[0] += weight[d]

    def _set_all(self, total) -> None:
        avg = (total["value"] / total["weight"][0]).astype(np.float32)
        for d in self.mine:
            self.models[d] = avg.copy()

    def _measure_speeds(self, model: np.ndarray) -> np.ndarray:
        """Steps per second of each device on its home rank's hardware, gathered on every rank."""
        mine = {}
        for d in self.mine:
            x, y = (t.to(self.device) for t in self.data.client(d))
            gen = torch_generator(self.job.seed, "hadfl-probe", d)
            self.flat.set(model)
            self.trainer.train_steps(x, y, gen, 1)  # warm-up: first-call allocations
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.trainer.train_steps(x, y, gen, PROBE_STEPS)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            mine[d] = PROBE_STEPS / max(time.perf_counter() - t0, 1e-9)
        self.flat.set(model)
        parts = self.comm.allgather(mine) if self.size > 1 else [mine]
        speeds = np.zeros(self.n)
        for part in parts:
            for d, v in part.items():
                speeds[d] = v
        return speeds
