"""The client executor: a rank's clients trained many at once, vectorised (``train.parallel_clients``).

For the small models of cross-device FL (logistic regression, MLPs; ~10-100 samples a client,
batch 10) a step's arithmetic takes microseconds and the time goes to per-step Python and kernel
dispatch. :class:`FusedMLP` trains a group of clients of a Linear/ReLU stack in one pass per step:
their weights stacked ``[k, out, in]``, batches gathered ``[k, B, in]``, forward and backward as
batched matrix products written out by hand (no autograd graph), and torch's SGD rule (momentum,
weight decay) applied to the stack. Per client it is the computation of the sequential loop
(``hpcfed.train.LocalSGD``), to float rounding:

- each client's batch order comes from its own generator (seed, round, client), drawn exactly as
  the sequential loop draws it; the last, partial batch of an epoch averages over its real rows
  only (padding rows carry zero weight);
- clients are sorted by their number of steps, so the ones still training are a leading slice of
  the stack: a client that has taken all its steps stops changing (no momentum or weight decay
  moves it afterwards); a straggler's ``[faults]`` share of steps is its own step count;
- a :class:`~hpcfed.train.GradientCorrection` (FedProx's proximal term, SCAFFOLD-style offsets
  shared by the group) is added to each gradient as in the sequential loop; only the parameters
  the trainer trains move (FedPT's frozen layers stay).

Each client's result does not depend on which clients share its group (batched products are
computed matrix by matrix), which the tests check; the engine still forms groups from the cohort
alone and places each group whole on one rank (hpcfed/placement.py), so the rank count cannot
change a result even where that property fails (other BLAS builds, GPUs).

How it plugs in: the engine tells the strategy which clients form the group; the first
:meth:`hpcfed.Strategy.train_client` of the group trains the whole group from the model then
loaded, and every later ``train_client`` of the group checks that it starts from that same model
(and correction) and takes its result. So FedAvg, FedProx, FedPT, DP-FedAvg, ``[compress]``,
``[faults]`` and user strategies built on ``train_client`` are vectorised without change; a
strategy whose clients start from different models, or that trains without ``train_client``
(SuperFed's and PriSM's sub-models, HADFL's devices, ResFed), trains one client at a time.

Where it applies (``"auto"``): models that are a stack of ``Linear`` layers with ReLU between them
(hpcfed's ``mlp``, or a user's ``nn.Sequential`` of Flatten/Linear/ReLU), no dropout, the
built-in ``cross_entropy`` loss, and hidden widths up to :data:`AUTO_MAX_WIDTH` (measured: the
gain falls to about 1x near a width of 2,048 on a CPU core). Anything else trains one at a time,
never slower than before. On CUDA the same code runs on the device, with one host sync per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# The widest hidden layer "auto" still fuses (BENCHMARKS.md: bench_parallel_clients.py).
AUTO_MAX_WIDTH = 1024
# Clients trained at once by "auto": beyond this the stacked activations outgrow the caches
# for no further gain (measured 100 -> 1,000: flat), and memory grows linearly.
AUTO_GROUP = 128


@dataclass
class Layer:
    weight: slice  # in the FlatModel vector
    bias: slice | None
    out_features: int
    in_features: int
    train_weight: bool
    train_bias: bool


@dataclass
class ClientResult:
    vector: torch.Tensor  # the client's trained flat model (float32, on the device)
    loss: float  # mean training loss over its samples seen
    steps: int
    samples: int


def linear_stack(module: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of a Linear/ReLU stack (ReLU after every layer but the last), or None."""
    from hpcfed.models.mlp import MLP

    if type(module) is MLP:
        return [*module.hidden, module.output]
    if type(module) is not nn.Sequential:
        return None
    layers, expect_linear = [], True
    for i, child in enumerate(module):
        if i == 0 and type(child) is nn.Flatten and child.start_dim == 1:
            continue
        if expect_linear and type(child) is nn.Linear:
            layers.append(child)
        elif not expect_linear and type(child) is nn.ReLU:
            pass
        else:
            return None
        expect_linear = not expect_linear
    return layers if layers and not expect_linear else None


class FusedMLP:
    """Trains groups of clients of one Linear/ReLU stack at once (see the module docstring)."""

    def __init__(self, flat, layers: list[nn.Linear], params, cfg):
        trained = {id(p) for p in params}
        names = {id(p): n for n, p in flat.module.named_parameters()}
        self.flat, self.cfg = flat, cfg
        self.layers = [
            Layer(
                weight=flat.slice_of(names[id(lin.weight)]),
                bias=flat.slice_of(names[id(lin.bias)]) if lin.bias is not None else None,
                out_features=lin.out_features,
                in_features=lin.in_features,
                train_weight=id(lin.weight) in trained,
                train_bias=lin.bias is not None and id(lin.bias) in trained,
            )
            for lin in layers
        ]

    @classmethod
    def build(cls, flat, trainer) -> FusedMLP | None:
        """The fused trainer for this model and loss, or None where it does not apply."""
        from hpcfed.losses import cross_entropy

        layers = linear_stack(flat.module)
        if layers is None or trainer.loss is not cross_entropy:
            return None
        return cls(flat, layers, trainer.opt.params, trainer.cfg)

    @property
    def max_width(self) -> int:
        return max(layer.out_features for layer in self.layers[:-1]) if len(self.layers) > 1 else 0

    # -- batches ------------------------------------------------------------------------------
    def _orders(self, n: int, generator: torch.Generator, limit: int | None) -> list[torch.Tensor]:
        """The client's minibatches, drawn as LocalSGD._run draws them (one randperm per epoch)."""
        cfg, batches = self.cfg, []
        for _ in range(cfg.epochs):
            if n == 0 or (limit is not None and len(batches) >= limit):
                break
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.batch_size):
                if limit is not None and len(batches) == limit:
                    break
                batches.append(order[start : start + cfg.batch_size])
        return batches

    # -- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def train(self, start: torch.Tensor, clients, correction=None) -> list[ClientResult]:
        """Train each of ``clients`` — ``(x, y, generator, max_steps or None)`` — from ``start``
        (the flat model); returns their results in the same order."""
        device, cfg, B = start.device, self.cfg, self.cfg.batch_size
        plans = [self._orders(int(x.shape[0]), gen, limit) for x, _, gen, limit in clients]
        order = sorted(range(len(clients)), key=lambda i: -len(plans[i]))  # still training: a prefix
        G, T = len(clients), max((len(p) for p in plans), default=0)
        # all of the group's samples in one tensor, plus one zero row that padding points at
        xs = [clients[i][0].reshape(clients[i][0].shape[0], -1) for i in order]
        ys = [clients[i][1] for i in order]
        d_in = self.layers[0].in_features
        X = torch.cat([*xs, torch.zeros(1, d_in)]).to(device=device, dtype=torch.float32)
        Y = torch.cat([*ys, torch.zeros(1, dtype=torch.long)]).to(device)
        pad = X.shape[0] - 1
        offsets = np.concatenate([[0], np.cumsum([x.shape[0] for x in xs])])
        index = torch.full((T, G, B), pad, dtype=torch.long)
        active = np.zeros(T, dtype=np.int64)  # clients still training at each step
        for slot, i in enumerate(order):
            for t, batch in enumerate(plans[i]):
                index[t, slot, : batch.numel()] = batch + int(offsets[slot])
            active[: len(plans[i])] = slot + 1
        index = index.to(device)
        real = (index != pad).to(torch.float32)  # [T, G, B]
        counts = real.sum(2)  # real rows per client and step

        weights, biases = self._stack(start, G)
        mom = cfg.momentum
        buffers: dict[int, torch.Tensor] = {}
        anchors, offsets_c = self._correction_views(correction, device)
        loss_sum = torch.zeros(G, device=device)
        for t in range(T):
            k = int(active[t])
            idx = index[t, :k]
            w_real = real[t, :k] / counts[t, :k, None]  # each client's mean over its real rows
            acts = [X[idx]]  # [k, B, d]
            for layer_i in range(len(self.layers)):
                W, b = weights[layer_i][:k], biases[layer_i]
                if b is not None:
                    z = torch.baddbmm(b[:k].unsqueeze(1), acts[-1], W.transpose(1, 2))
                else:
                    z = torch.bmm(acts[-1], W.transpose(1, 2))
                acts.append(torch.relu(z) if layer_i < len(self.layers) - 1 else z)
            logits = acts.pop()
            logp = torch.log_softmax(logits, dim=2)
            target = Y[idx]
            nll = -logp.gather(2, target.unsqueeze(2)).squeeze(2)  # [k, B]
            loss_sum[:k] += (nll * real[t, :k]).sum(1)
            grad = logp.exp()
            grad.scatter_add_(2, target.unsqueeze(2), -torch.ones_like(nll).unsqueeze(2))
            grad *= w_real.unsqueeze(2)  # dL/dz of the client's mean loss
            for layer_i in range(len(self.layers) - 1, -1, -1):
                layer = self.layers[layer_i]
                a_prev = acts[layer_i]
                W = weights[layer_i][:k]
                if layer_i > 0:  # before W changes: the gradient flowing to the layer below
                    below = torch.bmm(grad, W) * (a_prev > 0)
                if layer.train_weight:
                    gW = torch.bmm(grad.transpose(1, 2), a_prev)
                    key = 2 * layer_i
                    self._step(weights[layer_i], gW, k, buffers, key, anchors, offsets_c, layer.weight, mom)
                if layer.train_bias:
                    gb = grad.sum(1)
                    key = 2 * layer_i + 1
                    self._step(biases[layer_i], gb, k, buffers, key, anchors, offsets_c, layer.bias, mom)
                if layer_i > 0:
                    grad = below
        ends = self._unstack(start, weights, biases, G)
        losses = loss_sum.cpu().numpy()  # the group's one host sync
        results: list[ClientResult | None] = [None] * G
        for slot, i in enumerate(order):
            seen = int(sum(int(b.numel()) for b in plans[i]))
            results[i] = ClientResult(ends[slot], float(losses[slot]) / max(seen, 1), len(plans[i]), seen)
        return results

    def _step(self, param, grad, k, buffers, key, anchors, offsets, flat_slice, momentum):
        """torch's SGD rule on the first k clients of a stacked parameter (LocalSGD's arguments)."""
        cfg = self.cfg
        p = param[:k]
        if anchors is not None:  # FedProx: + mu (w - w_global)
            grad = grad + anchors[1] * (p - anchors[0][flat_slice].view(p.shape[1:]))
        if offsets is not None:  # a shared offset (SCAFFOLD-style c - c_i, the same for the group)
            grad = grad + offsets[flat_slice].view(p.shape[1:])
        if cfg.weight_decay:
            grad = grad + cfg.weight_decay * p
        if momentum:
            # every client takes its first step at t = 0 (torch: buf = g), later buf = m·buf + g;
            # the active clients only shrink, so each step's are a prefix of the first step's
            buf = buffers.get(key)
            if buf is None:
                grad = buffers[key] = grad.clone()
            else:
                view = buf[:k]
                view.mul_(momentum).add_(grad)
                grad = view
        p.add_(grad, alpha=-cfg.lr)

    def _correction_views(self, correction, device):
        if correction is None:
            return None, None
        anchors = None
        if correction.prox_mu and correction.flat_anchor is not None:
            anchors = (correction.flat_anchor.to(device), correction.prox_mu)
        offset = correction.flat_offset.to(device) if correction.flat_offset is not None else None
        return anchors, offset

    def _stack(self, start: torch.Tensor, G: int):
        weights, biases = [], []
        for layer in self.layers:
            w = start[layer.weight].view(layer.out_features, layer.in_features)
            weights.append(w.unsqueeze(0).repeat(G, 1, 1))
            if layer.bias is not None:
                biases.append(start[layer.bias].unsqueeze(0).repeat(G, 1))
            else:
                biases.append(None)
        return weights, biases

    def _unstack(self, start: torch.Tensor, weights, biases, G: int) -> list[torch.Tensor]:
        ends = start.unsqueeze(0).repeat(G, 1)
        for layer, w, b in zip(self.layers, weights, biases):
            ends[:, layer.weight] = w.reshape(G, -1)
            if b is not None:
                ends[:, layer.bias] = b
        return list(ends)


def group_size(setting, fused: FusedMLP | None) -> int:
    """Clients trained at once: ``train.parallel_clients`` resolved for this model (1: one by one)."""
    if fused is None:
        return 1
    if setting == "auto":
        return AUTO_GROUP if fused.max_width <= AUTO_MAX_WIDTH else 1
    return int(setting)


class GroupRun:
    """One group's clients for :meth:`hpcfed.Strategy.train_client` (the engine sets it up)."""

    def __init__(self, fused: FusedMLP, clients: list[int], shares: dict[int, float]):
        self.fused, self.clients, self.shares = fused, list(clients), shares
        self.start: torch.Tensor | None = None
        self.correction = None
        self.results: dict[int, ClientResult] = {}

    def result(self, strategy, cid: int, round_index: int, correction) -> ClientResult | None:
        """Client ``cid``'s result; the first call trains the whole group from the model loaded
        now. None when ``cid`` starts elsewhere (then it trains alone, one at a time)."""
        vector = strategy.flat.vector
        if self.start is None:
            self.start, self.correction = vector.detach().clone(), correction
            self._train(strategy, round_index)
        elif not (torch.equal(vector, self.start) and _same_correction(correction, self.correction)):
            return None
        return self.results.get(cid)

    def _train(self, strategy, round_index: int) -> None:
        from hpcfed.rng import torch_generator

        cfg, device, clients = self.fused.cfg, strategy.device, []
        for cid in self.clients:
            x, y = strategy.data.client(cid)
            planned = cfg.epochs * math.ceil(x.shape[0] / cfg.batch_size)
            share = self.shares.get(cid, 1.0)
            limit = None if share >= 1.0 else max(1, math.ceil(share * planned))
            gen = torch_generator(strategy.job.seed, "train", round_index, cid)
            clients.append((x.to(device), y.to(device), gen, limit))
        results = self.fused.train(self.start, clients, self.correction)
        self.results = dict(zip(self.clients, results))


def _same_correction(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None or a.prox_mu != b.prox_mu:
        return False
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in ((a.flat_anchor, b.flat_anchor), (a.flat_offset, b.flat_offset))
    )
