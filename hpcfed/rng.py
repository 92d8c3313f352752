"""Random generators derived from (seed, purpose, round, client), never from rank-local state.

Every random choice (cohorts, client data order, subnets, pairings, dropouts, noise) comes from a
generator keyed by what it is for and when, so every rank computes the same draw without talking,
a job gives the same model on any number of ranks, and a resumed run replays exactly.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _purpose_key(purpose: str) -> int:
    return zlib.crc32(purpose.encode())  # stable across processes, unlike hash()


def seed_sequence(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), _purpose_key(purpose), *(int(k) for k in keys)])


def numpy_generator(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A NumPy generator for (seed, purpose, *keys), e.g. ("cohort", round) or ("data", round, client)."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, *keys)))


def torch_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU torch generator for the same key (batch order of a client's local epochs)."""
    state = seed_sequence(seed, purpose, *keys).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def cohort(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> np.ndarray:
    """The round's clients: uniform without replacement, sorted (order never matters downstream)."""
    rng = numpy_generator(seed, "cohort", round_index)
    return np.sort(rng.choice(num_clients, size=clients_per_round, replace=False))
