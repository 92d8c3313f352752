"""The built-in losses of ``train.loss``: ``fn(outputs, targets) -> scalar`` (the batch mean).

A user loss (``train.loss = "mylab.losses:fn"``) has the same signature. A loss may carry a
``sum`` attribute, ``sum(outputs, targets)`` -> the batch's summed loss; evaluation uses it where
present (exactly what it computed before losses became pluggable) and ``fn(...) * batch size``
otherwise.

Sequence tasks (next-character prediction over TFF's Shakespeare, pfl's token files): a model
gives logits ``[N, T, V]`` (one distribution per position) against integer targets ``[N, T]``.
Target id :data:`PAD_ID` (0, TFF's and pfl's padding id) marks padding: it adds nothing to the
loss, and evaluation counts neither its loss nor its accuracy, so ``test_loss`` is the mean
per-token cross-entropy and ``test_accuracy`` the per-character accuracy over real tokens.
Per-sample classification (``[N, K]`` against ``[N]``) is untouched by this: id 0 is a class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcfed.errors import UserError

PAD_ID = 0  # the padding id of sequence targets (TFF's get_special_tokens, pfl's pad_symbol)


def is_sequence(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Per-position logits ``[N, T, V]`` against integer targets ``[N, T]``."""
    return targets.ndim >= 2 and outputs.ndim == targets.ndim + 1 and not targets.is_floating_point()


def _check_shapes(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if outputs.ndim == 3 and targets.ndim == 1:
        raise UserError(
            f"train.loss = 'cross_entropy': the model gives one prediction per position "
            f"{tuple(outputs.shape)} but the data has one target per sample {tuple(targets.shape)}; "
            "for next-character classification (LEAF Shakespeare) set model.options.outputs = 'last'"
        )


def _sequence_sum(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token cross-entropy, number of non-padding tokens) of a sequence batch."""
    flat_targets = targets.reshape(-1)
    total = F.cross_entropy(
        outputs.reshape(-1, outputs.shape[-1]), flat_targets, ignore_index=PAD_ID, reduction="sum"
    )
    return total, (flat_targets != PAD_ID).sum()


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[N, K]`` against class indices ``[N]``; for sequences,
    logits ``[N, T, V]`` against ``[N, T]``, the mean over the non-padding tokens (0 for a batch
    of padding only, where PyTorch's own mean would be NaN)."""
    if is_sequence(outputs, targets):
        total, tokens = _sequence_sum(outputs, targets)
        return total / tokens.clamp(min=1)
    _check_shapes(outputs, targets)
    return F.cross_entropy(outputs, targets)


def _cross_entropy_sum(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if is_sequence(outputs, targets):
        return _sequence_sum(outputs, targets)[0]
    _check_shapes(outputs, targets)
    return F.cross_entropy(outputs, targets, reduction="sum")


cross_entropy.sum = _cross_entropy_sum


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all output entries. Integer targets are class indices, compared as
    one-hot vectors (the squared-error classification loss some FL papers use); float targets are
    regression targets of the outputs' shape."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return F.mse_loss(outputs, targets.reshape(outputs.shape))
