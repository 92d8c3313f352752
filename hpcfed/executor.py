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

A client's result can differ in the last bits with the clients that share its group (each step
pads to the group's widest batch, and the width changes how BLAS blocks a product), so the engine
forms groups from the cohort alone and places each group whole on one rank
(hpcfed/placement.py): the rank count never changes a group, hence never a result. Strategies
whose clients live on fixed home ranks (``placement = "fixed"``) train one at a time, since their
groups could only be cut per rank.

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
# A group's inputs for all its steps are gathered at once up to this many floats (16 MB).
GATHER_ALL_FLOATS = 1 << 22


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
    def _step_counts(self, n: int, limit: int | None) -> tuple[int, int]:
        """(epochs drawn, steps taken) by a client of ``n`` samples, as LocalSGD._run counts them:
        ceil(n / B) batches an epoch, cut at ``limit`` steps (a straggler)."""
        cfg = self.cfg
        per_epoch = -(-n // cfg.batch_size)
        if limit is None or n == 0:
            return (cfg.epochs, cfg.epochs * per_epoch) if n else (0, 0)
        epochs = min(cfg.epochs, -(-limit // per_epoch))
        return epochs, min(limit, epochs * per_epoch)

    def _batches(self, clients, order, counts, offsets, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Every step's sample rows for the group, ``[G, T·B]`` (slot-major, so each client's
        are one contiguous run): the row in the group's shared tensor (padding points at row 0)
        and whether it is real. Each epoch is one randperm of the client's own generator, its
        batches of B in order and the last one partial, exactly as LocalSGD._run draws them."""
        B = self.cfg.batch_size
        G = len(order)
        index = np.zeros((G, T * B), dtype=np.int64)
        real = np.zeros((G, T * B), dtype=bool)
        for slot, i in enumerate(order):
            x, _, generator, _ = clients[i]
            n = int(x.shape[0])
            (epochs, steps), span = counts[i], -(-n // B) * B  # an epoch's rows, padded to batches
            for e in range(epochs):
                rows = torch.randperm(n, generator=generator).numpy()[: steps * B - e * span]
                at = e * span
                index[slot, at : at + rows.size] = rows + offsets[slot]
                real[slot, at : at + rows.size] = True
        return index, real

    # -- training -------------------------------------------------------------------------------
    @torch.no_grad()
    def train(self, start: torch.Tensor, clients, correction=None) -> list[ClientResult]:
        """Train each of ``clients`` — ``(x, y, generator, max_steps or None)`` — from ``start``
        (the flat model); returns their results in the same order."""
        counts = [self._step_counts(int(x.shape[0]), limit) for x, _, _, limit in clients]
        order = sorted(range(len(clients)), key=lambda i: -counts[i][1])  # still training: a prefix
        steps = np.array([counts[i][1] for i in order], dtype=np.int64)
        weights, biases, loss_sum, seen = self._train_stacks(start, clients, correction, counts, order, steps)
        # outside inference mode: the group's models are ordinary tensors that callers may change
        ends = self._assemble(start, weights, biases, len(clients))
        losses = loss_sum.cpu().numpy()  # the group's one host sync
        results: list[ClientResult | None] = [None] * len(clients)
        for slot, i in enumerate(order):
            results[i] = ClientResult(
                ends[slot], float(losses[slot]) / max(int(seen[slot]), 1), int(steps[slot]), int(seen[slot])
            )
        self.last_stack = (ends, order)  # the results' vectors are rows of ends, in this order
        return results

    # inference mode, not only no_grad: no version counters or view tracking on the many small
    # tensors of a step (measured: the group trains 15 % faster on the digits MLP)
    @torch.inference_mode()
    def _train_stacks(self, start, clients, correction, counts, order, steps):
        """The group's layer stacks after training ([G, out, in] weights, [G, out] biases, in
        ``order``), each slot's summed loss and samples seen."""
        device, cfg, B = start.device, self.cfg, self.cfg.batch_size
        G, T = len(clients), int(steps.max(initial=0))
        # all of the group's samples as rows of one tensor: the clients' own backing tensor when
        # they are row slices of it (in-memory datasets: no copy), else one concatenation
        d_in = self.layers[0].in_features
        # (on a GPU only the group's rows are copied to the device, not the whole backing tensor)
        X, Y, offsets = _shared_rows(
            [clients[i][0] for i in order], [clients[i][1] for i in order], d_in, share=device.type == "cpu"
        )
        X, Y = X.to(device=device, dtype=torch.float32), Y.to(device)
        index_np, real_np = self._batches(clients, order, counts, offsets, T)
        seen = real_np.sum(1)  # samples each slot's client sees
        active = (steps[None, :] > np.arange(T)[:, None]).sum(1)  # clients still training at step t
        real_np = real_np.reshape(G, T, B)
        width = real_np.sum(2).max(0) if G else np.zeros(0, np.int64)  # widest real batch per step
        # [T, G, B] views of the slot-major arrays: step t's rows for the first k clients
        index_t = torch.from_numpy(index_np).to(device).view(G, T, B).transpose(0, 1)
        real = torch.from_numpy(real_np).to(device=device, dtype=torch.float32)  # [G, T, B]
        targets = Y[index_t].unsqueeze(3)  # [T, G, B, 1]: every step's targets in one gather
        # and every step's inputs too, where they fit in a few MB (else a gather per step)
        inputs = X[index_t] if index_np.size * d_in <= GATHER_ALL_FLOATS else None  # [T, G, B, d]
        # each real row's weight in its client's mean loss: dL/dz of the mean is (p - onehot) * this
        row_weight = (real / real.sum(2, keepdim=True).clamp_(min=1.0)).transpose(0, 1).unsqueeze(3)
        minus_one = torch.full((G, B, 1), -1.0, device=device)
        picked = torch.zeros((T, G, B), device=device)  # log p of each row's target, for the loss

        # each layer's weights for the whole group, one contiguous [G, out, in] stack (a strided
        # view into a [G, P] stack would make torch update it matrix by matrix); assembled into
        # the group's flat models at the end
        weights = [
            start[L.weight].view(1, L.out_features, L.in_features).expand(G, -1, -1).clone()
            for L in self.layers
        ]
        biases = [start[L.bias].expand(G, -1).clone() if L.bias is not None else None for L in self.layers]
        mom = cfg.momentum
        buffers: dict[int, torch.Tensor] = {}
        anchors, offsets_c = self._correction_views(correction, device)
        last = len(self.layers) - 1
        # plain SGD (no momentum, weight decay or correction): W -= lr * g^T a in one fused product
        plain = not (mom or cfg.weight_decay or anchors is not None or offsets_c is not None)
        threshold_backward = torch.ops.aten.threshold_backward
        for t in range(T):
            k, w = int(active[t]), int(width[t])
            # padding beyond the widest real batch is never computed
            acts = [inputs[t, :k, :w] if inputs is not None else X[index_t[t, :k, :w]]]  # [k, w, d]
            for layer_i in range(last + 1):
                W, b = weights[layer_i][:k], biases[layer_i]
                if b is not None:
                    z = torch.baddbmm(b[:k].unsqueeze(1), acts[-1], W.transpose(1, 2))
                else:
                    z = torch.bmm(acts[-1], W.transpose(1, 2))
                acts.append(z.relu_() if layer_i < last else z)
            logp = torch.log_softmax(acts.pop(), dim=2)
            target = targets[t, :k, :w]
            picked[t, :k, :w] = logp.gather(2, target).squeeze(2)
            grad = logp.exp_()
            grad.scatter_add_(2, target, minus_one[:k, :w])
            grad *= row_weight[t, :k, :w]  # dL/dz of each client's mean loss
            for layer_i in range(last, -1, -1):
                layer = self.layers[layer_i]
                a_prev = acts[layer_i]
                W = weights[layer_i][:k]
                # the gradient flowing to the layer below, before W moves: (g W) * relu'(a_prev)
                below = threshold_backward(torch.bmm(grad, W), a_prev, 0) if layer_i > 0 else None
                if plain:
                    if layer.train_weight:
                        W.baddbmm_(grad.transpose(1, 2), a_prev, alpha=-cfg.lr)
                    if layer.train_bias:  # b -= lr * (sum of g's rows), as one small product
                        biases[layer_i][:k].add_(grad.sum(1), alpha=-cfg.lr)
                    grad = below
                    continue
                if layer.train_weight:
                    gW = torch.bmm(grad.transpose(1, 2), a_prev)
                    self._step(
                        weights[layer_i], gW, k, buffers, 2 * layer_i, anchors, offsets_c, layer.weight
                    )
                if layer.train_bias:
                    self._step(
                        biases[layer_i],
                        grad.sum(1),
                        k,
                        buffers,
                        2 * layer_i + 1,
                        anchors,
                        offsets_c,
                        layer.bias,
                    )
                grad = below
        # each client's summed loss over its real rows, in one reduction
        return weights, biases, -(picked * real.transpose(0, 1)).sum((0, 2)), seen

    def _assemble(self, start: torch.Tensor, weights, biases, G: int) -> torch.Tensor:
        """The group's flat models ``[G, P]`` from the layer stacks: one concatenation when the
        layers tile the flat vector in order (hpcfed's MLP), else written into a copy of start."""
        pieces, end = [], 0
        for layer, W, bias in zip(self.layers, weights, biases):
            for part, where in ((W, layer.weight), (bias, layer.bias)):
                if part is None:
                    continue
                if where.start != end:
                    pieces = None
                    break
                pieces.append(part.reshape(G, -1))
                end = where.stop
            if pieces is None:
                break
        if pieces is not None and end == start.numel():
            return torch.cat(pieces, dim=1)
        ends = start.unsqueeze(0).expand(G, -1).clone()
        for layer, W, bias in zip(self.layers, weights, biases):
            ends[:, layer.weight] = W.reshape(G, -1)
            if bias is not None:
                ends[:, layer.bias] = bias
        return ends

    def _step(self, param, grad, k, buffers, key, anchors, offsets, flat_slice):
        """torch's SGD rule on the first k clients of a stacked parameter (LocalSGD's arguments)."""
        cfg, momentum = self.cfg, self.cfg.momentum
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


def _shared_rows(xs: list[torch.Tensor], ys: list[torch.Tensor], d_in: int, share: bool = True):
    """(X, Y, row offset of each client): the rows of one base tensor the clients' tensors are
    contiguous slices of (``FederatedData`` in memory), or (``share = False``, or no common base)
    their concatenation."""

    def base_of(t: torch.Tensor):
        return t._base if t._base is not None else t

    bx, by = base_of(xs[0]), base_of(ys[0])
    shared = share and bx.is_contiguous() and by.is_contiguous() and bx.dim() >= 1 and by.dim() == 1
    if shared:
        row = math.prod(bx.shape[1:])
        shared = row == d_in
    if shared:
        offsets = []
        for x, y in zip(xs, ys):
            if not (base_of(x) is bx and base_of(y) is by and x.is_contiguous() and y.is_contiguous()):
                shared = False
                break
            start = x.storage_offset() - bx.storage_offset()
            if start % row or y.storage_offset() - by.storage_offset() != start // row:
                shared = False
                break
            offsets.append(start // row)
    if shared and bx.shape[0] > 0:
        return bx.reshape(bx.shape[0], d_in), by, np.array(offsets, dtype=np.int64)
    flat = [x.reshape(x.shape[0], d_in) for x in xs]
    X = torch.cat([*flat, torch.zeros(1, d_in, dtype=flat[0].dtype)])  # (a row for an all-empty group)
    Y = torch.cat([*ys, torch.zeros(1, dtype=ys[0].dtype)])
    return X, Y, np.cumsum([0, *(x.shape[0] for x in flat)])[:-1]


def group_size(setting, fused: FusedMLP | None, placement: str = "balanced") -> int:
    """Clients trained at once: ``train.parallel_clients`` resolved for this model (1: one by one)."""
    if fused is None or placement == "fixed":
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
        self.stack: torch.Tensor | None = None
        self.stack_clients: list[int] = []

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
        from hpcfed.rng import torch_generators
        from hpcfed.train import step_limit

        cfg, device, clients = self.fused.cfg, strategy.device, []
        generators = torch_generators(strategy.job.seed, "train", round_index, self.clients)
        for cid, gen in zip(self.clients, generators):
            x, y = strategy.data.client(cid)
            limit = step_limit(self.shares.get(cid, 1.0), x.shape[0], cfg)
            clients.append((x.to(device), y.to(device), gen, limit))
        results = self.fused.train(self.start, clients, self.correction)
        self.results = dict(zip(self.clients, results))
        ends, order = self.fused.last_stack
        # the group's models as one [G, P] stack and the client of each row (group_update's input)
        self.stack, self.stack_clients = ends, [self.clients[i] for i in order]


def _same_correction(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None or a.prox_mu != b.prox_mu:
        return False
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in ((a.flat_anchor, b.flat_anchor), (a.flat_offset, b.flat_offset))
    )
