"""Federated datasets: ``load_federated(cfg.data, seed)`` -> :class:`FederatedData` of clients.

``data.dataset`` goes through :mod:`hpcfed.registry`: a built-in name is a reference to a loader in
one module per source (:mod:`.digits`, scikit-learn, bundled; :mod:`.synthetic`, LEAF / FedProx
Synthetic(alpha, beta); :mod:`.h5`, TFF/FedML federated HDF5; :mod:`.torchvision_local`, MNIST and
CIFAR-10 from a local torchvision root), anything else is the user's ``"module:load"``. Either is
called as ``load(seed, **options)`` and returns a :class:`FederatedData` (pooled, given clients,
or lazy clients); :func:`federate` then makes the clients the engine trains: a pooled set is split
by ``data.partition`` (:mod:`.partition`), given or lazy clients are the natural partition (the
first ``data.num_clients`` of them) or are pooled and re-split by any other partition.

The dataset and its partition are a pure function of (``data`` config, seed): every MPI rank loads
the same one without talking, and nothing depends on rank-local state or the global NumPy RNG
(architecture.md, principle 3). In-memory clients are contiguous slices of one array, made once at
load; ``client()`` is O(1) and returns the same tensors every time (do not modify them in place).
Lazy clients are read when trained, so 100,000 clients cost nothing up front.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpcfed import registry
from hpcfed.config import DataConfig
from hpcfed.data.federated import FederatedData, as_tensors, in_memory
from hpcfed.errors import UserError
from hpcfed.rng import numpy_generator

__all__ = ["FederatedData", "FederatedDataset", "dataset_options", "federate", "load_federated"]

FederatedDataset = FederatedData  # the name before the public API; kept for readers of old code


def dataset_options(cfg: DataConfig) -> dict[str, Any]:
    """The keyword options of the loader: a built-in's own ``[data]`` keys, then ``data.options``."""
    return registry.call_options("data.dataset", cfg.dataset, "data", cfg, cfg.options)


def build_source(cfg: DataConfig, seed: int) -> FederatedData:
    """What the loader returns, checked to be a FederatedData (UserError naming the key if not)."""
    load = registry.resolve_callable("data.dataset", cfg.dataset)
    options = dataset_options(cfg)
    source = load(seed, **options)
    if not isinstance(source, FederatedData):
        raise UserError(
            f"data.dataset = {cfg.dataset!r}: returned {type(source).__name__}; expected a "
            "hpcfed.FederatedData (FederatedData.pooled, .from_clients or .lazy)"
        )
    return source


def load_federated(cfg: DataConfig, seed: int) -> FederatedData:
    """The federated dataset of ``cfg`` for job seed ``seed`` (identical on every rank)."""
    return federate(build_source(cfg, seed), cfg, seed)


def _partition(cfg: DataConfig, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    from hpcfed.data import partition

    if cfg.partition != "iid" and labels.dtype.kind not in "iu":
        raise UserError(f"data.partition = {cfg.partition!r} splits by class label; float targets need 'iid'")
    return partition.by_name(
        cfg.partition,
        labels,
        cfg.num_clients,
        numpy_generator(seed, "partition"),
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
    )


def _pool(source: FederatedData) -> tuple[np.ndarray, np.ndarray]:
    """Every client of a given or lazy dataset, concatenated in client order."""
    parts = [source.client(cid) for cid in range(source.num_clients)]
    return (
        np.concatenate([p[0].numpy() for p in parts]),
        np.concatenate([p[1].numpy() for p in parts]),
    )


def federate(source: FederatedData, cfg: DataConfig, seed: int) -> FederatedData:
    """The clients the engine trains on, from what a loader returned (see the module docstring)."""
    if source.kind == "pooled":
        if cfg.partition == "natural":
            raise UserError(
                f"data.partition = 'natural': data.dataset = {cfg.dataset!r} gives one pooled training set, "
                "not clients; use iid, dirichlet or classes (or FederatedData.from_clients/.lazy)"
            )
        X, y = source.train
        parts = _partition(cfg, np.asarray(y), seed)
        return in_memory(source.name, (X, y), source.test, parts, source.num_classes, source.transform)
    if cfg.partition != "natural":  # pool every given client, then split as asked
        X, y = _pool(source)
        return in_memory(source.name, (X, y), source.test, _partition(cfg, y, seed), source.num_classes)
    if cfg.num_clients > source.num_clients:
        raise UserError(
            f"data.num_clients: {cfg.num_clients} clients asked for but data.dataset = {cfg.dataset!r} "
            f"gives {source.num_clients}; expected at most {source.num_clients}"
        )
    if cfg.num_clients == source.num_clients:
        return source
    keep = cfg.num_clients  # the first num_clients, in the loader's client order
    return FederatedData(
        name=source.name, num_classes=source.num_classes, input_shape=source.input_shape,
        client_sizes=source.client_sizes[:keep], load_client=source.client, load_test=lambda: source.test,
        kind=source.kind,
    )  # fmt: skip


# (as_tensors is the one conversion every source uses)
__all__ += ["as_tensors"]
