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
# seed_seq): torch_generators() computes the same seeds for many clients in one vectorised pass.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4


def _seed_words(seed: int, purpose: str, keys: np.ndarray) -> np.ndarray:
    """``seed_sequence(seed, purpose, *row).generate_state(2, np.uint64)[0]`` for every row of
    ``keys`` ([n, k] integers in [0, 2^32)), in uint32 arithmetic on whole columns."""
    u32 = np.uint32
    n = keys.shape[0]
    entropy = [np.full(n, seed, u32), np.full(n, _purpose_key(purpose), u32)]
    entropy += [keys[:, j].astype(u32) for j in range(keys.shape[1])]
    with np.errstate(over="ignore"):
        hash_const = u32(_INIT_A)

        def hashmix(value):
            nonlocal hash_const
            value = value ^ hash_const
            hash_const = u32(hash_const * u32(_MULT_A))
            value = value * hash_const
            return value ^ (value >> u32(16))

        def mix(x, y):
            r = u32(_MIX_L) * x - u32(_MIX_R) * y
            return r ^ (r >> u32(16))

        zero = np.zeros(n, u32)
        pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL)]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        for src in range(_POOL, len(entropy)):
            for dst in range(_POOL):
                pool[dst] = mix(pool[dst], hashmix(entropy[src]))
        words, hash_b = [], u32(_INIT_B)
        for i in range(2):  # two 32-bit words: the first uint64 of generate_state(2, uint64)
            value = pool[i] ^ hash_b
            hash_b = u32(hash_b * u32(_MULT_B))
            value = value * hash_b
            words.append(value ^ (value >> u32(16)))
    return words[0].astype(np.uint64) | (words[1].astype(np.uint64) << np.uint64(32))


def torch_generators(seed: int, purpose: str, round_index: int, clients) -> list[torch.Generator]:
    """``[torch_generator(seed, purpose, round_index, c) for c in clients]``, the seeds computed
    in one vectorised pass (a group of clients trained at once draws them together)."""
    clients = np.asarray(clients, dtype=np.int64)
    if not (0 <= seed < 2**32 and 0 <= round_index < 2**32 and ((clients >= 0) & (clients < 2**32)).all()):
        return [torch_generator(seed, purpose, round_index, int(c)) for c in clients]
    keys = np.stack([np.full(clients.size, round_index, np.int64), clients], axis=1)
    seeds = _seed_words(seed, purpose, keys) >> np.uint64(1)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
