"""A dataset loader: called as load(seed, **data.options); it must be a pure function of its
arguments (every rank builds it independently and the ranks compare what they built).

Here: scikit-learn's bundled digits (no download), cut into ``clients`` "writers", each with its
own brightness shift, the kind of feature skew a natural partition has. Every random choice comes
from a generator seeded by ``seed``."""

import numpy as np
from sklearn.datasets import load_digits

import hpcfed


def load(seed, clients=60, shift=0.3):
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)  # seeded: the same on every rank
    order = rng.permutation(len(y))
    test, train = order[:300], order[300:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6  # the training split's statistics
    x = ((x - mean) / std).astype(np.float32)
    writers = []
    for i, part in enumerate(np.array_split(train, clients)):
        offset = shift * (i / clients - 0.5)  # writer i's pen is a little lighter or darker
        writers.append((x[part] + offset, y[part]))
    return hpcfed.FederatedData.from_clients(writers, test=(x[test], y[test]))
