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


# NumPy's SeedSequence mixing constants (numpy/random/bit_generator.pyx, after M. E. O'Neill's
# seed_seq): torch_generators() computes the same seeds for many clients in one pass.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL, _MASK = 0xCA01F9DD, 0x4973F715, 4, 0xFFFFFFFF


def _seed_words(seed: int, purpose: str, *keys) -> np.ndarray:
    """``seed_sequence(seed, purpose, *keys).generate_state(2, np.uint64)[0]`` where each key is
    an int or an array of them (all in [0, 2^32)), for every element of the arrays at once.

    NumPy's algorithm, in 32-bit words held as Python ints or uint64 arrays and masked: a word
    that depends only on scalar keys stays a Python int, so the part shared by a group's clients
    (seed, purpose, round) costs a few integer operations and only the words that depend on the
    client are array operations (about 30 for a group of any size)."""
    hash_const = _INIT_A

    def hashmix(value):
        nonlocal hash_const
        value = value ^ hash_const
        hash_const = hash_const * _MULT_A & _MASK
        value = value * hash_const & _MASK
        return value ^ (value >> 16)

    def mix(x, y):
        r = (_MIX_L * x - _MIX_R * y) & _MASK
        return r ^ (r >> 16)

    entropy = [int(seed), _purpose_key(purpose)]
    entropy += [k if isinstance(k, int) else np.asarray(k, dtype=np.uint64) for k in keys]
    pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(entropy)):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    words, hash_b = [], _INIT_B  # two 32-bit words: the first uint64 of generate_state(2, uint64)
    for i in range(2):
        value = pool[i] ^ hash_b
        hash_b = hash_b * _MULT_B & _MASK
        value = value * hash_b & _MASK
        words.append(value ^ (value >> 16))
    return np.asarray(words[0] | (words[1] << 32), dtype=np.uint64)


def torch_generators(seed: int, purpose: str, round_index: int, clients) -> list[torch.Generator]:
    """``[torch_generator(seed, purpose, round_index, c) for c in clients]``, the seeds computed
    in one pass (a group of clients trained at once draws them together)."""
    clients = np.asarray(clients, dtype=np.int64)
    if not (0 <= seed < 2**32 and 0 <= round_index < 2**32 and ((clients >= 0) & (clients < 2**32)).all()):
        return [torch_generator(seed, purpose, round_index, int(c)) for c in clients]
    seeds = _seed_words(seed, purpose, int(round_index), clients) >> np.uint64(1)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
