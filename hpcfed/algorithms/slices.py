"""What the sub-model algorithms (PriSM, SuperFed) share: a client trains slices of the model.

The slices go down through the strategy's codec, the client trains the small model they make, its
change goes up through the job's ``[compress]`` uplink, and the server adds ``w·θ`` with weight
``w`` at exactly those positions of the round's buffer (per-element weights, architecture
principle 2), so overlapping slices average and untouched positions keep their value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcfed.algorithms.base import Update
from hpcfed.rng import torch_generator


def contribution(size: int, index: np.ndarray, theta: np.ndarray, w: float) -> Update:
    """One client's additive part of the round: ``w·θ`` and ``w`` at its slices' positions."""
    value, weight = np.zeros(size), np.zeros(size)
    value[index] = w * np.asarray(theta, dtype=np.float64)
    weight[index] = w
    return Update(value=value, weight=weight)


@dataclass
class SliceRound:
    down: bytes  # the downlink message (the slices)
    up: bytes  # the uplink message (their change)
    theta: np.ndarray  # float64: what the server rebuilds, received slices + decoded change
    loss: float  # mean training loss
    samples: float


def train_slices(strategy, flat, trainer, values: np.ndarray, client_id: int, round_index: int) -> SliceRound:
    """Send ``values`` (the client's slices) down, train them in ``flat``'s model, send the change up.

    ``strategy`` provides ``codec`` (downlink), ``compression`` (uplink), ``data``, ``device`` and
    ``job``; the batch order comes from (seed, round, client) as for every client.
    """
    down, _ = strategy.codec.encode(values, {})
    received, _ = strategy.codec.decode(down, {})
    flat.set(received)
    x, y = strategy.data.client(client_id)
    x, y = x.to(strategy.device), y.to(strategy.device)
    loss, _ = trainer.train(x, y, torch_generator(strategy.job.seed, "train", round_index, client_id))
    up, decoded = strategy.compression.send_up(client_id, round_index, flat.get() - received)
    return SliceRound(down, up, received.astype(np.float64) + decoded, loss, float(y.shape[0]))
