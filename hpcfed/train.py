"""Local training and evaluation, shared by every algorithm.

Plain minibatch SGD over in-memory tensors: a permutation from the client's own generator
(seed, round, client) orders the samples, so a client's training is the same on any rank.
No DataLoader: at FL client sizes its worker and collation machinery costs more than the maths.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager

import torch

from hpcfed import registry
from hpcfed.config import TrainConfig
from hpcfed.losses import cross_entropy

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

    def train(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[float, int]:
        """Train in place for ``cfg.epochs`` epochs; return (mean training loss, number of steps).

        Inside :func:`local_work` (a straggler) only ``ceil(share * steps)`` of the steps run."""
        limit = None
        share = _WORK_SHARE.get()
        if share < 1.0:
            planned = self.cfg.epochs * math.ceil(x.shape[0] / self.cfg.batch_size)
            limit = max(1, math.ceil(share * planned))
        loss_sum, samples, steps = self._run(x, y, generator, epochs=self.cfg.epochs, max_steps=limit)
        return loss_sum / max(samples, 1), steps

    def train_steps(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, steps: int
    ) -> tuple[float, int]:
        """Train in place for exactly ``steps`` minibatch steps (HADFL's τ_i), passing through
        fresh permutations of the data as often as needed; return (mean loss, samples seen)."""
        loss_sum, samples, _ = self._run(x, y, generator, epochs=None, max_steps=steps)
        return loss_sum / max(samples, 1), samples

    def _run(self, x, y, generator, epochs: int | None, max_steps: int | None) -> tuple[float, int, int]:
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
    NaN for regression targets (float ``y``), so the accuracy it gives is NaN too."""
    model.eval()
    correct = 0.0 if is_classification(y) else float("nan")
    loss_sum = 0.0
    device = next(model.parameters()).device
    batch_sum = getattr(loss, "sum", None)  # the loss's own summed form, else mean x batch size
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(batch_sum(logits, yb) if batch_sum else loss(logits, yb) * yb.shape[0])
        if is_classification(yb):
            correct += float((logits.argmax(-1) == yb).sum())
    return correct, loss_sum, int(x.shape[0])
