"""Local training and evaluation, shared by every algorithm.

Plain minibatch SGD over in-memory tensors: a permutation from the client's own generator
(seed, round, client) orders the samples, so a client's training is the same on any rank.
No DataLoader: at FL client sizes its worker and collation machinery costs more than the maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcfed.config import TrainConfig


class LocalSGD:
    """Minibatch SGD on one client's tensors, reusing one optimiser for every client.

    Building a ``torch.optim.SGD`` costs about as much as a few training steps of a small model,
    so the optimiser is made once per rank and its state (momentum buffers) cleared per client:
    every client still starts from a fresh optimiser state. ``params`` restricts training to a
    subset (frozen weights stay out of the optimiser and need no gradient state).
    """

    def __init__(
        self, model: torch.nn.Module, cfg: TrainConfig, params: list[torch.nn.Parameter] | None = None
    ):
        self.model, self.cfg = model, cfg
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def train(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[float, int]:
        """Train in place for ``cfg.epochs`` epochs; return (mean training loss, number of steps)."""
        model, opt, cfg = self.model, self.opt, self.cfg
        opt.state.clear()
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
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                # accumulate on the device: one host sync per client, not one per step
                total += loss.detach() * idx.numel()
                steps += 1
        return float(total) / max(n * cfg.epochs, 1), steps


@torch.inference_mode()
def evaluate_sums(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float, int]:
    """(number correct, summed cross-entropy, count) on one shard of the test set."""
    model.eval()
    correct = 0.0
    loss_sum = 0.0
    device = next(model.parameters()).device
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += float((logits.argmax(1) == yb).sum())
    return correct, loss_sum, int(x.shape[0])
