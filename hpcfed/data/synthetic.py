"""Synthetic(alpha, beta): the heterogeneous logistic-regression data of FedProx on LEAF.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (FedProx, arXiv 1812.06127),
generated with its LEAF-based code (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings",
arXiv 1812.01097), after Shamir et al. 2014. For user k, with 60 features and 10 classes:

    u_k ~ N(0, alpha),  B_k ~ N(0, beta)            (alpha: model skew, beta: feature skew)
    W_k ~ N(u_k, 1) [60 x 10],  b_k ~ N(u_k, 1) [10]
    v_k[j] ~ N(B_k, 1),  Sigma = diag(j ** -1.2),  j = 1..60
    x ~ N(v_k, Sigma),  y = argmax(softmax(W_k^T x + b_k))
    n_k = floor(lognormal(4, 2)) + 50                (the reference's sizes)

(the second argument of N is the standard deviation, as in the reference's ``np.random.normal``).

Where we differ, and why:
- Every user is drawn from its own generator ``numpy_generator(seed, "synthetic", k)``, so one
  user can be generated without the others: 100,000 users cost nothing until a user is trained.
  The sizes come from one generator keyed "synthetic-sizes", vectorised (cheap at any scale).
- n_k is capped at 1,000 so memory stays bounded; lognormal(4, 2) has a heavy tail (a few users
  in 100,000 would otherwise hold millions of samples).
- x = v_k + sqrt(diag(Sigma)) * z instead of ``multivariate_normal``: the same distribution, since
  Sigma is diagonal, and far cheaper.
- The reference splits each user 90/10; we split 80/20 (the last fifth of a user's draws is its
  test part; draws are i.i.d., so that is a random split). The test set is the union of the test
  parts of the first ``min(num_users, 200)`` users: users are i.i.d. draws, so those are a random
  sample of users, and the test set stays small (<= 40,000 samples) at 100,000 users.
"""

from __future__ import annotations

import numpy as np

from hpcfed.rng import numpy_generator

DIM = 60
NUM_CLASSES = 10
INPUT_SHAPE = (DIM,)
MIN_SAMPLES = 50
MAX_SAMPLES = 1000
TEST_USERS = 200

# sqrt of Sigma's diagonal, j ** -1.2 for j = 1..60
_SCALE = np.power(np.arange(1, DIM + 1, dtype=np.float64), -1.2) ** 0.5


def user_sizes(num_users: int, seed: int) -> np.ndarray:
    """Total samples (train + test) of every user, int64; vectorised from one generator."""
    rng = numpy_generator(seed, "synthetic-sizes")
    n = rng.lognormal(4.0, 2.0, num_users).astype(np.int64) + MIN_SAMPLES
    return np.minimum(n, MAX_SAMPLES)


def train_sizes(total: np.ndarray) -> np.ndarray:
    """The 80 % train part of each user (the test part is ``total // 5``)."""
    return total - total // 5


def generate_user(k: int, n: int, alpha: float, beta: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``n`` samples of user ``k``: X float32 [n, 60], y int64 [n]."""
    rng = numpy_generator(seed, "synthetic", k)
    u = rng.normal(0.0, alpha)
    b_mean = rng.normal(0.0, beta)
    W = rng.normal(u, 1.0, (DIM, NUM_CLASSES))
    b = rng.normal(u, 1.0, NUM_CLASSES)
    v = rng.normal(b_mean, 1.0, DIM)
    x = v + rng.standard_normal((n, DIM)) * _SCALE
    # softmax is monotone, so argmax of the logits is the reference's argmax(softmax(.)).
    y = np.argmax(x @ W + b, axis=1)
    return x.astype(np.float32), y.astype(np.int64)


class SyntheticUsers:
    """The users of one Synthetic(alpha, beta) draw; each generated on demand."""

    def __init__(self, num_users: int, alpha: float, beta: float, seed: int):
        self.num_users = num_users
        self.alpha, self.beta, self.seed = alpha, beta, seed
        self.total_sizes = user_sizes(num_users, seed)
        self.train_sizes = train_sizes(self.total_sizes)

    def _user(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return generate_user(k, int(self.total_sizes[k]), self.alpha, self.beta, self.seed)

    def train(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        X, y = self._user(k)
        n = int(self.train_sizes[k])
        return np.ascontiguousarray(X[:n]), y[:n].copy()

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._user(k) for k in range(min(self.num_users, TEST_USERS))]
        n = self.train_sizes
        X = np.concatenate([X[n[k] :] for k, (X, _) in enumerate(parts)])
        y = np.concatenate([y[n[k] :] for k, (_, y) in enumerate(parts)])
        return X, y

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """Every user's train part, concatenated in user order (for the non-natural partitions)."""
        parts = [self.train(k) for k in range(self.num_users)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# Lazy clients kept in memory: enough for every client of a small job, bounded for a huge one
# (synthetic clients hold at most 1,000 x 60 float32 = 240 kB).
LAZY_CACHE_CLIENTS = 256


def load_federated(
    seed: int, num_clients: int = 30, synthetic_alpha: float = 1.0, synthetic_beta: float = 1.0
):
    """``data.dataset = "synthetic"``: ``num_clients`` users generated on demand (the natural
    partition); another ``data.partition`` pools their training parts, in user order."""
    from hpcfed.data.federated import FederatedData

    users = SyntheticUsers(num_clients, synthetic_alpha, synthetic_beta, seed)
    return FederatedData.lazy(
        sizes=users.train_sizes, read_client=users.train, test=users.test, input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES, cache_clients=LAZY_CACHE_CLIENTS, name="synthetic",
    )  # fmt: skip
