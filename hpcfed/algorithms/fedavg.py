"""FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629), with optional FedAvgM / FedAdam.

Clients start from the global model, run local SGD, and send their model delta. The server
averages the deltas weighted by sample counts and applies a server optimiser to that average:
plain FedAvg is server SGD with lr 1, which equals the sample-weighted average of client models;
FedAvgM (Hsu et al. 2019, arXiv 1909.06335) adds server momentum; FedAdam (Reddi et al. 2021,
arXiv 2003.00295) uses Adam's moments with adaptivity tau.

Where we differ: clients send deltas rather than models (identical average, and deltas are what
compression and DP clip); the average is accumulated in float64 so the result does not depend on
how clients are spread over ranks.
"""

from __future__ import annotations

import numpy as np

from hpcfed.algorithms.base import Strategy, Update, weighted_mean
from hpcfed.algorithms.compression import Compression
from hpcfed.codecs import IdentityCodec
from hpcfed.rng import torch_generator
from hpcfed.train import LocalSGD


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codec = IdentityCodec()  # the full model, downlink
        self.compression = Compression(self.job.compress, self.job.seed, self.data_clients())
        self._down: bytes = b""
        self._down_len = 0
        self.trainer = LocalSGD(self.flat.module, self.job.train)

    def init_state(self) -> dict[str, np.ndarray]:
        state = super().init_state()
        cfg = self.job.fedavg
        if cfg.server_optimizer == "adam":
            state["adam_m"] = np.zeros(self.flat.size)
            state["adam_v"] = np.zeros(self.flat.size)
        elif cfg.server_momentum > 0:
            state["momentum"] = np.zeros(self.flat.size)
        return state

    def data_clients(self) -> int:
        return self.data.num_clients if self.data is not None else self.job.data.num_clients

    @property
    def placement(self) -> str:
        return "fixed" if self.compression.needs_home_rank else self.job.placement

    def begin_round(self, state, round_index):
        # every client receives the same model: encode it once per round and per rank
        self._down, _ = self.codec.encode(state["model"], {})
        self._down_len = self.compression.down_bytes(state, len(self._down))

    def client_update(self, state, client_id, round_index) -> Update:
        received, _ = self.codec.decode(self._down, {})
        self.flat.set(received)
        x, y = self.data.client(client_id)
        x, y = x.to(self.device), y.to(self.device)
        gen = torch_generator(self.job.seed, "train", round_index, client_id)
        loss, _ = self.trainer.train(x, y, gen)
        delta = self.flat.get() - received
        # what the server really has: the decoded bytes
        up, decoded = self.compression.send_up(client_id, round_index, delta)
        n = float(y.shape[0])
        return Update(
            value=decoded.astype(np.float64) * n,
            weight=n,
            metrics={"loss_sum": loss * n, "samples": n, "bytes_up": len(up), "bytes_down": self._down_len},
        )

    def server_update(self, state, total: Update, round_index):
        step = weighted_mean(total, np.zeros(self.flat.size))  # average delta; 0 if nobody reported
        cfg = self.job.fedavg
        if cfg.server_optimizer == "adam":
            state["adam_m"] = cfg.beta1 * state["adam_m"] + (1 - cfg.beta1) * step
            state["adam_v"] = cfg.beta2 * state["adam_v"] + (1 - cfg.beta2) * step**2
            step = state["adam_m"] / (np.sqrt(state["adam_v"]) + cfg.tau)
        elif "momentum" in state:
            state["momentum"] = cfg.server_momentum * state["momentum"] + step
            step = state["momentum"]
        step = self.compression.compress_step(state, cfg.server_lr * step, round_index)
        state["model"] = (state["model"] + step).astype(np.float32)
        return state

    def extra_state(self):
        return self.compression.state_arrays()

    def load_extra_state(self, arrays):
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        mine = {k: v for k, v in arrays.items() if int(k.rsplit(".", 1)[1]) % size == rank}
        self.compression.load_state_arrays(mine)
