"""A model builder: called as build(input_shape, num_classes, **model.options) on every rank,
after the engine has seeded torch, so every rank builds the same initial weights."""

import math

from torch import nn


def build(input_shape, num_classes, width=64, dropout=0.0):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        nn.ReLU(),
        nn.Dropout(dropout),  # dropout draws are keyed to (seed, round, client) by the engine
        nn.Linear(width, num_classes),
    )
