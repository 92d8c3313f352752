"""The built-in losses of ``train.loss``: ``fn(outputs, targets) -> scalar`` (the batch mean).

A user loss (``train.loss = "mylab.losses:fn"``) has the same signature. A loss may carry a
``sum`` attribute, ``sum(outputs, targets)`` -> the batch's summed loss; evaluation uses it where
present (exactly what it computed before losses became pluggable) and ``fn(...) * batch size``
otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[N, K]`` against class indices ``[N]``."""
    return F.cross_entropy(outputs, targets)


cross_entropy.sum = lambda outputs, targets: F.cross_entropy(outputs, targets, reduction="sum")


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all output entries. Integer targets are class indices, compared as
    one-hot vectors (the squared-error classification loss some FL papers use); float targets are
    regression targets of the outputs' shape."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return F.mse_loss(outputs, targets.reshape(outputs.shape))
