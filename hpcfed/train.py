"""Local training and evaluation, shared by every algorithm.

Plain minibatch SGD over in-memory tensors: a permutation from the client's own generator
(seed, round, client) orders the samples, so a client's training is the same on any rank.
No DataLoader: at FL client sizes its worker and collation machinery costs more than the maths.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hpcfed import registry
from hpcfed.config import TrainConfig
from hpcfed.losses import PAD_ID, cross_entropy, is_sequence

# The share of its local steps the client being trained completes ([faults] slow_prob: a straggler).
# The engine sets it around ``client_update``, so every algorithm's local training honours it
# without each strategy passing it down.
_WORK_SHARE = contextvars.ContextVar("local_work_share", default=1.0)


@contextmanager
def local_work(share: float):
    """Within this block, :meth:`LocalSGD.train` stops after ``ceil(share * steps)`` steps (at least 1)."""
    token = _WORK_SHARE.set(float(share))
    try:
        yield
    finally:
        _WORK_SHARE.reset(token)


def step_limit(share: float, n: int, cfg: TrainConfig) -> int | None:
    """A straggler's steps: ``ceil(share * planned)`` (at least 1) of the ``epochs * ceil(n / B)``
    planned; None when the client does all its work (``share >= 1``)."""
    if share >= 1.0:
        return None
    return max(1, math.ceil(share * cfg.epochs * math.ceil(n / cfg.batch_size)))


class SGD:
    """``torch.optim.SGD``'s update through its functional form, ``torch.optim.sgd.sgd``: the
    function ``SGD.step`` itself calls, with the same arguments, so the numbers are the same bit
    for bit (tested). Why not the class: constructing any ``torch.optim.Optimizer`` imports
    ``torch._dynamo`` (``add_param_group`` is wrapped to disable it), which costs ~1.9 s and ~90 MB
    of resident memory per process here, about half of a small run's start-up and per rank.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.param_groups = [{"params": self.params}]  # as torch.optim, for readers of the params
        self.buffers: dict[int, torch.Tensor] = {}  # momentum buffer per parameter (by position)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def clear(self) -> None:
        """A fresh optimiser state (no momentum buffers)."""
        self.buffers.clear()

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim.sgd import sgd

        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        buffers = [self.buffers.get(i) for i in live] if self.momentum else []
        sgd(
            params,
            [p.grad for p in params],
            buffers,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            has_sparse_grad=False,
            foreach=None,  # torch.optim.SGD's default: the function picks the implementation
            fused=None,
        )
        if self.momentum:
            self.buffers.update(zip(live, buffers))


@dataclass
class GradientCorrection:
    """An affine change of every local gradient before each step:
    ``g <- g + prox_mu * (w - anchor) + offset``, per parameter.

    The two corrections of the classic baselines: FedProx's proximal term (Li et al. 2020; the
    gradient of ``mu/2 * ||w - w_global||^2``: ``prox_mu = mu``, ``anchor`` the global model) and
    SCAFFOLD's control variates (Karimireddy et al. 2020: ``offset = c - c_i``). Build it with
    :meth:`for_model` from flat vectors over the model's :class:`~hpcfed.flat.FlatModel` layout.
    """

    items: list[tuple[torch.nn.Parameter, torch.Tensor | None, torch.Tensor | None]]
    prox_mu: float = 0.0
    flat_anchor: torch.Tensor | None = None  # the whole-model vectors (the vectorised executor's)
    flat_offset: torch.Tensor | None = None

    @classmethod
    def for_model(cls, flat, params, *, prox_mu: float = 0.0, anchor=None, offset=None) -> GradientCorrection:
        """``anchor``/``offset``: flat vectors (NumPy or tensors) of the whole model, or None."""
        names = {id(p): n for n, p in flat.module.named_parameters()}
        device = flat.vector.device

        def tensor(v):
            return None if v is None else torch.as_tensor(v, dtype=torch.float32).to(device)

        anchor_t, offset_t = tensor(anchor), tensor(offset)
        items = []
        for p in params:
            s = flat.slice_of(names[id(p)])
            a = anchor_t[s].view(p.shape) if anchor_t is not None and prox_mu else None
            o = offset_t[s].view(p.shape) if offset_t is not None else None
            items.append((p, a, o))
        anchor_t = anchor_t if prox_mu else None
        return cls(items=items, prox_mu=float(prox_mu), flat_anchor=anchor_t, flat_offset=offset_t)

    @torch.no_grad()
    def apply(self) -> None:
        for p, anchor, offset in self.items:
            if p.grad is None:
                continue
            if anchor is not None:
                p.grad.add_(p - anchor, alpha=self.prox_mu)
            if offset is not None:
                p.grad.add_(offset)


class LocalSGD:
    """Minibatch SGD on one client's tensors, reusing one optimiser for every client.

    Building an optimiser costs about as much as a few training steps of a small model, so it is
    made once per rank and its state (momentum buffers) cleared per client:
    every client still starts from a fresh optimiser state. ``params`` restricts training to a
    subset (frozen weights stay out of the optimiser and need no gradient state).
    """

    def __init__(
        self, model: torch.nn.Module, cfg: TrainConfig, params: list[torch.nn.Parameter] | None = None
    ):
        self.model, self.cfg = model, cfg
        self.loss = job_loss(cfg)
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        self.opt = SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def train(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        correction: GradientCorrection | None = None,
    ) -> tuple[float, int]:
        """Train in place for ``cfg.epochs`` epochs; return (mean training loss, number of steps).

        Inside :func:`local_work` (a straggler) only ``ceil(share * steps)`` of the steps run.
        ``correction`` changes each step's gradient (FedProx, SCAFFOLD)."""
        limit = step_limit(_WORK_SHARE.get(), x.shape[0], self.cfg)
        loss_sum, samples, steps = self._run(
            x, y, generator, epochs=self.cfg.epochs, max_steps=limit, correction=correction
        )
        return loss_sum / max(samples, 1), steps

    def train_steps(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, steps: int
    ) -> tuple[float, int]:
        """Train in place for exactly ``steps`` minibatch steps (HADFL's τ_i), passing through
        fresh permutations of the data as often as needed; return (mean loss, samples seen)."""
        loss_sum, samples, _ = self._run(x, y, generator, epochs=None, max_steps=steps)
        return loss_sum / max(samples, 1), samples

    def _run(
        self, x, y, generator, epochs: int | None, max_steps: int | None, correction=None
    ) -> tuple[float, int, int]:
        """The one training loop: ``epochs`` passes (None: unbounded), stopping early after
        ``max_steps`` batches (None: no limit); returns (loss sum, samples seen, steps)."""
        model, opt, cfg = self.model, self.opt, self.cfg
        opt.clear()
        # Dropout draws from torch's global generator: key it to this client too, so a client's
        # training never depends on which rank ran it or what ran before.
        # (not torch.manual_seed: it also queues lazy CUDA/XPU/MTIA seeding with a formatted
        # stack trace each call, about 1 ms per client)
        dropout_seed = generator.initial_seed() ^ 0x5DEECE66D
        torch.default_generator.manual_seed(dropout_seed)
        if x.device.type == "cuda":
            torch.cuda.manual_seed(dropout_seed)  # the current device's generator
        model.train()
        n = x.shape[0]
        total = torch.zeros((), device=x.device)
        done = samples = epoch = 0
        while (epochs is None or epoch < epochs) and (max_steps is None or done < max_steps) and n > 0:
            order = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n, cfg.batch_size):
                if max_steps is not None and done == max_steps:
                    break
                idx = order[start : start + cfg.batch_size]
                opt.zero_grad()
                loss = self.loss(model(x[idx]), y[idx])
                loss.backward()
                if correction is not None:
                    correction.apply()
                opt.step()
                # accumulate on the device: one host sync per client, not one per step
                total += loss.detach() * idx.numel()
                done += 1
                samples += idx.numel()
            epoch += 1
        return float(total), samples, done


def job_loss(cfg: TrainConfig):
    """The callable ``train.loss`` names: ``fn(outputs, targets) -> scalar`` (UserError if not)."""
    return registry.resolve_callable("train.loss", cfg.loss)


def is_classification(y: torch.Tensor) -> bool:
    """Integer targets are class indices: accuracy is defined. Float targets are regression."""
    return not y.is_floating_point()


@torch.inference_mode()
def evaluate_sums(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024, loss=cross_entropy
) -> tuple[float, float, int]:
    """(number correct, summed loss, count) on one shard of the test set; the number correct is
    NaN for regression targets (float ``y``), so the accuracy it gives is NaN too.

    Sequence targets (integer ``y`` of ``[N, T]`` against outputs ``[N, T, V]``, see
    :mod:`hpcfed.losses`): ``count`` is the number of non-padding tokens and ``correct`` the
    tokens predicted right among them, so the engine's ``correct / count`` is the per-character
    accuracy and ``loss / count`` the mean token loss. Per-sample classification is unchanged."""
    model.eval()
    correct = 0.0 if is_classification(y) else float("nan")
    loss_sum = 0.0
    count = int(x.shape[0])
    tokens = 0
    sequence = False
    device = next(model.parameters()).device
    batch_sum = getattr(loss, "sum", None)  # the loss's own summed form, else mean x batch size
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        if is_sequence(logits, yb):
            sequence = True
            real = yb != PAD_ID
            n_real = int(real.sum())
            tokens += n_real
            loss_sum += float(batch_sum(logits, yb) if batch_sum else loss(logits, yb) * n_real)
            correct += float(((logits.argmax(-1) == yb) & real).sum())
            continue
        loss_sum += float(batch_sum(logits, yb) if batch_sum else loss(logits, yb) * yb.shape[0])
        if is_classification(yb):
            correct += float((logits.argmax(-1) == yb).sum())
    return correct, loss_sum, tokens if sequence else count
