"""FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629), with FedAvgM / FedAdam / FedAdagrad /
FedYogi server optimisers.

Clients start from the global model, run local SGD, and send their model delta. The server
averages the deltas weighted by sample counts and applies a server optimiser to that average:
plain FedAvg is server SGD with lr 1, which equals the sample-weighted average of client models;
FedAvgM (Hsu et al. 2019, arXiv 1909.06335) adds server momentum. The adaptive ones are Reddi et
al., "Adaptive Federated Optimization" (ICLR 2021, arXiv 2003.00295), Algorithm 2, with the
average delta Δ as the pseudo-gradient: m ← β1·m + (1−β1)·Δ, then
FedAdagrad v ← v + Δ², FedYogi v ← v − (1−β2)·Δ²·sign(v − Δ²), FedAdam v ← β2·v + (1−β2)·Δ²,
and x ← x + η·m / (√v + τ). As in the paper there is no bias correction; FedAdagrad's and
FedYogi's v start at τ² (the paper's v₋₁ ≥ τ²), FedAdam's at 0 (as hpcfed always had it).

Where we differ: clients send deltas rather than models (identical average, and deltas are what
compression and DP clip); the average is accumulated in float64 so the result does not depend on
how clients are spread over ranks. A ``[dp]`` table makes it DP-FedAvg (McMahan et al. 2018, arXiv
1710.06963): clipped updates, every client weighing 1, Gaussian noise on the sum (``dp.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcfed.algorithms.base import Strategy, Update, weighted_mean
from hpcfed.algorithms.compression import Compression
from hpcfed.algorithms.dp import DP_METRICS, make_dp
from hpcfed.codecs import IdentityCodec


class FedAvg(Strategy):
    """Subclass it for a variant: override :meth:`aggregate` (the average client delta the server
    steps with) or :meth:`server_update`/:meth:`client_update` (docs/algorithms.md)."""

    name = "fedavg"
    supports_dp = True
    supports_robust = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codec = IdentityCodec()  # the full model, downlink
        self.compression = Compression(self.job.compress, self.job.seed, self.data_clients())
        self._down: bytes = b""
        self._down_len = 0
        self.dp = make_dp(self.job, self.data_clients(), self.comm)  # None without a [dp] table
        if self.dp is not None:
            self.extra_metrics = (*self.extra_metrics, *DP_METRICS)

    def init_state(self) -> dict[str, np.ndarray]:
        state = super().init_state()
        cfg = self.job.fedavg
        size = self.part(state["model"]).size
        if cfg.server_optimizer == "adam":
            state["adam_m"] = np.zeros(size)
            state["adam_v"] = np.zeros(size)
        elif cfg.server_optimizer in ("adagrad", "yogi"):
            state["adapt_m"] = np.zeros(size)
            state["adapt_v"] = np.full(size, cfg.tau**2)
        elif cfg.server_momentum > 0:
            state["momentum"] = np.zeros(size)
        return state

    # The part of the model that travels and is averaged: all of it here. FedPT overrides these
    # four to send only its trainable entries (the frozen rest never leaves the seed).
    def part(self, model: np.ndarray) -> np.ndarray:
        return model

    def with_part(self, model: np.ndarray, part: np.ndarray) -> np.ndarray:
        return part

    def load_part(self, part: np.ndarray) -> None:
        self.flat.set(part)

    def read_part(self) -> np.ndarray:
        return self.flat.get()

    def data_clients(self) -> int:
        return self.data.num_clients if self.data is not None else self.job.data.num_clients

    @property
    def placement(self) -> str:
        return "fixed" if self.compression.needs_home_rank else self.job.placement

    def begin_round(self, state, round_index):
        # every client receives the same bytes: encode them once per round and per rank, and
        # decode them once (each client's copy of the decoded model is the same array)
        self._down, _ = self.codec.encode(self.part(state["model"]), {})
        self._down_len = self.compression.down_bytes(state, len(self._down))
        self._received, _ = self.codec.decode(self._down, {})

    def client_update(self, state, client_id, round_index) -> Update:
        received = self._received
        self.load_part(received)
        loss, self.last_steps, samples = self.local_training(client_id, round_index)
        delta = self.read_part() - received
        # what the server really has: the decoded bytes
        up, decoded = self.compression.send_up(client_id, round_index, delta)
        n = float(samples)
        metrics = {"loss_sum": loss * n, "samples": n, "bytes_up": len(up), "bytes_down": self._down_len}
        if self.dp is None:
            return Update(value=decoded.astype(np.float64) * n, weight=n, metrics=metrics)
        # DP-FedAvg: the clipped update, every client weighing 1 (bounded sensitivity)
        clipped, was_clipped = self.dp.clip(decoded)
        metrics["clipped_updates"] = float(was_clipped)
        return Update(value=clipped, weight=1.0, metrics=metrics)

    def group_update(self, state, client_ids: list[int], round_index: int) -> Update | None:
        """The summed update of a group of clients trained at once (hpcfed/executor.py), in one
        pass over the stacked models; None where the per-client path must run (DP clipping, a
        compressing uplink, or a subclass that changes ``client_update``). Each client's delta is
        still encoded into its own message (its bytes are counted), and a client whose delta is
        not finite is left out and counted in ``rejected_updates``, as the engine does per client."""
        plain = type(self).client_update is FedAvg.client_update
        if self.dp is not None or self.compression.up_on or not plain or self.group is None:
            return None
        received = self._received
        self.load_part(received)
        self.local_training(client_ids[0], round_index)  # trains the group, with this strategy's correction
        group = self.group
        if group.stack is None or set(group.stack_clients) != set(client_ids):
            return None  # the group did not train here (another start): per client after all
        results = [group.results[c] for c in group.stack_clients]  # in the stack's row order
        start = torch.from_numpy(received).to(group.stack.device)
        parts = self.read_parts(group.stack)
        # the deltas in float32 (as each client's message holds them), then widened to float64 for
        # the sum, both in buffers kept between rounds: a fresh one of this size costs more in page
        # faults than the arithmetic (G x p x 8 bytes, 7.7 MB at 100 x 9,610), and a float32
        # subtraction and a cast take 1.4x less time than one subtraction into a float64 output
        buffers = getattr(self, "_group_buffers", None)
        if buffers is None or buffers[0].shape != parts.shape or buffers[0].device != parts.device:
            buffers = self._group_buffers = (
                torch.empty_like(parts),
                torch.empty(parts.shape, dtype=torch.float64, device=parts.device),
            )
        deltas = buffers[1].copy_(torch.sub(parts, start, out=buffers[0]))
        sizes = torch.from_numpy(np.array([r.samples for r in results], dtype=np.float64))
        losses = np.array([r.loss for r in results], dtype=np.float64)
        value = (sizes.to(deltas.device) @ deltas).cpu().numpy()  # sum of n_i delta_i, float64
        # a client whose delta is not finite makes the sum non-finite (n_i >= 0; 0 * inf is NaN),
        # so the rows are looked at only then, and the sum is formed again without them
        finite = np.ones(len(results), dtype=bool)
        if not np.isfinite(value).all():
            rows = torch.isfinite(deltas).all(1)
            value = (sizes.to(deltas.device)[rows] @ deltas[rows]).cpu().numpy()
            finite = rows.cpu().numpy()
        kept = sizes.numpy() * finite
        # The uplink is the identity codec, whose messages have a fixed length (the per-client
        # path encodes them; here nothing would decode them, so only their length is taken)
        message = self.compression.identity.encoded_size(deltas.shape[1])
        metrics = {
            "loss_sum": float(losses[finite] @ kept[finite]),
            "samples": float(kept.sum()),
            "bytes_up": float(message * len(client_ids)),
            "bytes_down": float(self._down_len * len(client_ids)),
            "rejected_updates": float(len(results) - finite.sum()),
        }
        return Update(value=value, weight=float(kept.sum()), metrics=metrics)

    def read_parts(self, vectors: torch.Tensor) -> torch.Tensor:
        """:meth:`read_part` of a stack of flat models ``[G, P]``."""
        return vectors

    def local_training(self, client_id: int, round_index: int) -> tuple[float, int, int]:
        """The client's local SGD from the model just loaded: (mean loss, steps, samples). The
        hook FedProx overrides (a proximal term); FedNova reads the steps (``last_steps``)."""
        return self.train_client(client_id, round_index)  # the params that require grad

    def aggregate(self, total: Update, round_index: int) -> np.ndarray:
        """The round's average client delta (float64), before the server optimiser."""
        if self.dp is None:
            return weighted_mean(total, np.zeros(total.value.size))  # 0 if nobody reported
        return self.dp.average(total.value, round_index)  # (clipped sum + noise) / cohort

    def server_update(self, state, total: Update, round_index):
        old = self.part(state["model"])
        step = self.aggregate(total, round_index)
        cfg = self.job.fedavg
        if cfg.server_optimizer == "adam":
            state["adam_m"] = cfg.beta1 * state["adam_m"] + (1 - cfg.beta1) * step
            state["adam_v"] = cfg.beta2 * state["adam_v"] + (1 - cfg.beta2) * step**2
            step = state["adam_m"] / (np.sqrt(state["adam_v"]) + cfg.tau)
        elif cfg.server_optimizer in ("adagrad", "yogi"):
            state["adapt_m"] = cfg.beta1 * state["adapt_m"] + (1 - cfg.beta1) * step
            square = step**2
            if cfg.server_optimizer == "adagrad":
                state["adapt_v"] = state["adapt_v"] + square
            else:  # Yogi: v moves towards Δ² additively, at most (1 - β2)·Δ² per round
                sign = np.sign(state["adapt_v"] - square)
                state["adapt_v"] = state["adapt_v"] - (1 - cfg.beta2) * square * sign
            step = state["adapt_m"] / (np.sqrt(state["adapt_v"]) + cfg.tau)
        elif "momentum" in state:
            state["momentum"] = cfg.server_momentum * state["momentum"] + step
            step = state["momentum"]
        step = self.compression.compress_step(state, cfg.server_lr * step, round_index)
        state["model"] = self.with_part(state["model"], (old + step).astype(np.float32))
        return state

    def server_metrics(self, state, round_index):
        return {} if self.dp is None else {"epsilon": self.dp.epsilon(round_index + 1)}

    def extra_state(self):
        return self.compression.state_arrays()

    def load_extra_state(self, arrays):
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        mine = {k: arrays[k] for k in arrays if int(k.rsplit(".", 1)[1]) % size == rank}
        self.compression.load_state_arrays(mine)
