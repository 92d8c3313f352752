"""Partitioners: which training samples each client holds.

Each partitioner is a pure function of (labels, num_clients, its parameters, rng) returning one
sorted int64 index array per client, every sample in exactly one of them. The rng is always derived
from (seed, "partition") by the caller, so every MPI rank computes the same partition without
talking (architecture.md, principle 3).

- ``iid``: a uniform shuffle cut into ``num_clients`` near-equal pieces.
- ``dirichlet``: label skew of Hsu, Qi & Brown 2019 ("Measuring the effects of non-identical data
  distribution", arXiv 1909.06335), as the benchmark defines it: for each class, the class's samples
  are divided over the clients in proportions drawn from Dir(alpha) (benchmarks.md). A small alpha
  leaves clients empty; see :func:`dirichlet` for the deterministic top-up that prevents it.
- ``classes``: pathological label skew in the style of McMahan et al. 2017 (FedAvg, arXiv
  1602.05629): each client holds ``classes_per_client`` distinct classes, and each class's samples are
  split evenly among the clients that hold it.
- ``natural`` is dataset-defined (LEAF users, HDF5 file clients) and lives with those datasets.
"""

from __future__ import annotations

import numpy as np

from hpcfed.config import UserError


def _check_enough_samples(num_samples: int, num_clients: int) -> None:
    if num_clients > num_samples:
        raise UserError(
            f"data.num_clients: {num_clients} clients but only {num_samples} training samples; "
            "expected at most one client per sample"
        )


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then split into near-equal contiguous pieces (sizes differ by at most one)."""
    _check_enough_samples(len(labels), num_clients)
    perm = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, proportions ~ Dir(alpha * 1) over clients; then top up empty clients.

    The class's shuffled samples are cut at ``floor(cumsum(p) * n_c)`` (the cut used by FedML,
    Flower and the Hsu et al. code). With small alpha many clients draw (almost) nothing; instead of
    FedML's "resample until every client has >= k samples" (which never terminates for e.g.
    alpha = 0.05 with 100 clients on digits), each empty client in turn takes one random sample from
    the currently largest client. That moves at most ``num_clients`` samples, keeps the draw itself
    untouched when no client is empty, and is deterministic given the rng.
    """
    _check_enough_samples(len(labels), num_clients)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):  # sorted, so the draw order is fixed
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for k, piece in enumerate(np.split(idx, cuts)):
            if len(piece):
                parts[k].append(piece)
    out = [np.concatenate(ps) if ps else np.empty(0, np.int64) for ps in parts]
    sizes = np.array([len(o) for o in out])
    for k in np.flatnonzero(sizes == 0):  # ascending client id: deterministic order
        donor = int(np.argmax(sizes))  # first of the largest, so ties break by client id
        j = int(rng.integers(sizes[donor]))
        out[k] = out[donor][j : j + 1]
        out[donor] = np.delete(out[donor], j)
        sizes[k], sizes[donor] = 1, sizes[donor] - 1
    return [np.sort(o).astype(np.int64, copy=False) for o in out]


def classes(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` distinct classes; a class's samples are split evenly.

    Classes are dealt round-robin from one random permutation of the classes to the clients in a
    random order, so every class is held by floor or ceil of ``num_clients * c / K`` clients (hence
    every sample is assigned) and a client's classes are distinct (``c <= K``).
    """
    _check_enough_samples(len(labels), num_clients)
    present = np.unique(labels)
    k_classes = len(present)
    c = classes_per_client
    if c > k_classes:
        raise UserError(f"data.classes_per_client: {c} exceeds the {k_classes} classes of the training data")
    if num_clients * c < k_classes:
        raise UserError(
            f"data.classes_per_client: {num_clients} clients x {c} classes cannot cover all "
            f"{k_classes} classes; expected num_clients * classes_per_client >= {k_classes}"
        )
    class_order = present[rng.permutation(k_classes)]
    client_order = rng.permutation(num_clients)
    holders: dict[int, list[int]] = {int(cl): [] for cl in present}
    for rank, client in enumerate(client_order):
        for j in range(c):
            holders[int(class_order[(rank * c + j) % k_classes])].append(int(client))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cl in present:
        idx = rng.permutation(np.flatnonzero(labels == cl))
        owners = sorted(holders[int(cl)])
        if len(idx) < len(owners):
            raise UserError(
                f"data.num_clients: class {int(cl)} has {len(idx)} samples for {len(owners)} clients "
                "holding it; expected fewer clients or more classes_per_client"
            )
        for owner, piece in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[owner].append(piece)
    return [np.sort(np.concatenate(ps)).astype(np.int64, copy=False) for ps in parts]


def by_name(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Dispatch on ``data.partition`` (``natural`` is the dataset's business, not ours)."""
    labels = np.asarray(labels)
    if name == "iid":
        return iid(labels, num_clients, rng)
    if name == "dirichlet":
        return dirichlet(labels, num_clients, alpha, rng)
    if name == "classes":
        return classes(labels, num_clients, classes_per_client, rng)
    raise UserError(
        f"data.partition: {name!r} is not available for this dataset; expected iid, dirichlet or classes"
    )
