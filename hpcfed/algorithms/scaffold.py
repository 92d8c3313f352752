"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, arXiv 1910.06378), Algorithm 1.

Client drift under heterogeneous data is corrected by control variates: the server keeps ``c``
(an estimate of the global update direction), each client ``c_i`` (of its own). Every local step
uses ``g(y_i) + c - c_i`` (:class:`hpcfed.train.GradientCorrection`); after K steps the client
updates its control variate,

- option II (the default): ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (free: from the steps taken),
- option I: ``c_i+ = ∇F_i(x)``, the client's full gradient at the received model (one more pass),

and sends ``Δy = y_i - x`` and ``Δc = c_i+ - c_i``. The server steps
``x ← x + η_g · mean(Δy)`` and ``c ← c + (1/N) Σ Δc`` (N = ``data.num_clients``).

In hpcfed: ``c`` is in the replicated server state (checkpointed in ``server/``); each ``c_i``
lives on its client's fixed home rank (``placement = "fixed"``), in memory or in an HDF5 scratch
file per rank (``scaffold.state = "disk"``, for many clients), and is checkpointed as
``clients/control.<id>``; a client that never took part has ``c_i = 0`` and costs nothing. The
round's one Allreduce carries Σ Δy, the count and Σ Δc together (``Δc`` as an extra sum). Bytes are
the real messages both ways: the client receives x and c and sends Δy and Δc (twice FedAvg's, as
float32 identity-coded vectors; the server uses the decoded values).

Where we differ: the paper averages Δy uniformly over the sampled clients (as here) and assumes
plain local SGD; with ``train.momentum`` > 0 option II's ``(x - y_i)/(K lr)`` is only an estimate
of the average gradient (allowed, not recommended). A straggler's K is the steps it took. Not with
``[compress]``, ``[dp]`` or ``[robust]`` (refused at start-up, exit 2).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcfed.algorithms.base import Strategy, Update
from hpcfed.algorithms.client_store import make_store
from hpcfed.codecs import IdentityCodec
from hpcfed.errors import UserError


class Scaffold(Strategy):
    name = "scaffold"

    @classmethod
    def check_job(cls, job) -> None:
        super().check_job(job)
        if job.compress.active:
            raise UserError(
                "[compress] does not apply to algorithm 'scaffold' (it sends Δy and Δc uncompressed)"
            )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg = self.job.scaffold
        self.codec = IdentityCodec()
        self.store = make_store(self.cfg.state)  # this rank's clients' c_i
        self._down_len = 0

    @property
    def placement(self) -> str:
        return "fixed"  # c_i stays on its client's home rank

    def extra_sums_sizes(self) -> dict[str, int]:
        return {"control": self.flat.size}

    def init_state(self):
        state = super().init_state()
        state["control"] = np.zeros(self.flat.size, dtype=np.float32)  # c
        return state

    def begin_round(self, state, round_index):
        # every client receives x and c: two messages, encoded once per rank and round
        self._down = [self.codec.encode(state[k], {})[0] for k in ("model", "control")]
        self._down_len = sum(len(m) for m in self._down)
        x, c = (self.codec.decode(m, {})[0] for m in self._down)
        self._x, self._c = x, c.astype(np.float64)

    def _send(self, vector: np.ndarray) -> tuple[int, np.ndarray]:
        data, _ = self.codec.encode(vector, {})
        return len(data), self.codec.decode(data, {})[0].astype(np.float64)

    def client_update(self, state, client_id, round_index) -> Update:
        x, c = self._x, self._c
        stored = self.store.get(client_id)
        c_i = stored["c"].astype(np.float64) if stored is not None else np.zeros_like(c)
        self.flat.set(x)
        correction = self.correction(offset=(c - c_i).astype(np.float32))
        loss, steps, n = self.train_client(client_id, round_index, correction=correction)
        y = self.flat.get().astype(np.float64)
        if self.cfg.control_update == "II":
            c_new = c_i - c + (x - y) / (max(steps, 1) * self.job.train.lr)
        else:
            c_new = self.full_gradient(x, client_id)
        self.store[client_id] = {"c": c_new.astype(np.float32)}
        up_y, dy = self._send(y - x)
        up_c, dc = self._send(c_new.astype(np.float32) - c_i.astype(np.float32))
        metrics = {"loss_sum": loss * n, "samples": float(n), "bytes_up": up_y + up_c}
        metrics["bytes_down"] = self._down_len
        return Update(value=dy, weight=1.0, metrics=metrics, extras={"control": dc})

    def full_gradient(self, x: np.ndarray, client_id: int) -> np.ndarray:
        """Option I: ∇F_i(x), the mean gradient over the client's whole data at the model x."""
        module, loss_fn = self.flat.module, self.trainer.loss
        self.flat.set(x)
        module.train()
        params = self.trainer.opt.params
        for p in params:
            p.grad = None
        xs, ys = self.data.client(client_id)
        xs, ys = xs.to(self.device), ys.to(self.device)
        n = xs.shape[0]
        for start in range(0, n, 1024):  # sum of batch means x batch size = n x full mean
            xb, yb = xs[start : start + 1024], ys[start : start + 1024]
            (loss_fn(module(xb), yb) * (xb.shape[0] / n)).backward()
        grad = torch.zeros(self.flat.size, dtype=torch.float32)
        names = {id(p): name for name, p in module.named_parameters()}
        for p in params:
            if p.grad is not None:
                grad[self.flat.slice_of(names[id(p)])] = p.grad.detach().reshape(-1).cpu()
            p.grad = None
        return grad.numpy().astype(np.float64)

    def server_update(self, state, total: Update, round_index):
        count = float(np.asarray(total.weight).item())
        if count > 0:
            step = self.cfg.server_lr * total.value / count
            state["model"] = (state["model"] + step).astype(np.float32)
            control = state["control"] + total.extras["control"] / self.job.data.num_clients
            state["control"] = control.astype(np.float32)
        return state

    # -- per-client control variates in checkpoints ---------------------------------------------
    def iter_extra_state(self):
        for cid in self.store:  # one client at a time (the disk store holds the rest on disk)
            yield f"control.{cid}", self.store.get(cid)["c"]

    def extra_state(self):
        return dict(self.iter_extra_state())

    def load_extra_state(self, arrays) -> None:
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        self.store.clear()
        for name in arrays:
            cid = int(name.rsplit(".", 1)[1])
            if cid % size == rank:
                self.store[cid] = {"c": np.asarray(arrays[name], dtype=np.float32)}
