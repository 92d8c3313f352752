"""A multi-layer perceptron: flatten, ``Linear`` + ReLU per hidden width, then a linear output.

``state_dict`` keys: ``hidden.{i}.weight`` / ``hidden.{i}.bias`` for the hidden layers and
``output.weight`` / ``output.bias`` for the classifier. ``hidden = []`` gives multinomial
logistic regression (the usual model for LEAF's Synthetic data). For digits (64 features) with
the default ``hidden = [128]`` this is 64-128-10: 64·128 + 128 + 128·10 + 10 = 9,610 parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hpcfed.errors import UserError


def build(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,)) -> MLP:
    """``model.name = "mlp"``: hidden widths from ``model.hidden``."""
    if any(w < 1 for w in hidden):
        raise UserError(f"model.hidden: widths must be positive integers (got {list(hidden)})")
    return MLP(input_shape, hidden, num_classes)


class MLP(nn.Module):
    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.output(x)
