"""Local training and evaluation, shared by every algorithm.

Plain minibatch SGD over in-memory tensors: a permutation from the client's own generator
(seed, round, client) orders the samples, so a client's training is the same on any rank.
No DataLoader: at FL client sizes its worker and collation machinery costs more than the maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcfed.config import TrainConfig


def local_sgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    params: list[torch.nn.Parameter] | None = None,
) -> tuple[float, int]:
    """Train in place for ``cfg.epochs`` epochs; return (mean training loss, number of steps).

    ``params`` restricts the optimiser to a subset (frozen weights stay out of it and need no
    gradient state).
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    n = x.shape[0]
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    steps = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
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
