"""Federated datasets: ``load_federated(cfg.data, seed)`` -> :class:`FederatedDataset`.

The dataset and its partition are a pure function of (``data`` config, seed): every MPI rank loads
the same one without talking, and nothing depends on rank-local state or the global NumPy RNG
(architecture.md, principle 3).

Sources, one module each: :mod:`.digits` (scikit-learn, bundled), :mod:`.synthetic` (LEAF /
FedProx Synthetic(alpha, beta)), :mod:`.h5` (TFF/FedML federated HDF5), :mod:`.torchvision_local`
(MNIST, CIFAR-10 from a local torchvision root). Partitioners are in :mod:`.partition`.

Two kinds of datasets come out:

- in memory (digits, mnist, cifar10, and any non-natural partition): the training samples are
  gathered once into client order, so each client's tensors are contiguous slices of one array,
  made once at load; ``client()`` is O(1) and returns the same tensors every time (do not modify
  them in place);
- lazy (``partition = "natural"`` for synthetic and h5): client sizes are known from metadata and
  ``client(cid)`` generates or reads only that client, so 100,000 clients cost nothing up front.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from hpcfed.config import DataConfig
from hpcfed.data import digits, partition, synthetic, torchvision_local
from hpcfed.rng import numpy_generator

__all__ = ["FederatedDataset", "load_federated"]

Pair = tuple[torch.Tensor, torch.Tensor]

# Lazy clients kept in memory: enough for every client of a small job, bounded for a huge one
# (synthetic clients hold at most 1,000 x 60 float32 = 240 kB).
LAZY_CACHE_CLIENTS = 256


def _tensors(X: np.ndarray, y: np.ndarray) -> Pair:
    return (
        torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


class FederatedDataset:
    """Clients' training data and the shared test set.

    ``num_clients``, ``num_classes``, ``input_shape`` (per sample) and ``client_sizes`` (int64,
    known without loading any client) are plain attributes; ``client(cid)`` gives X float32
    ``[n, *input_shape]`` and y int64 ``[n]`` as contiguous CPU tensors; ``test`` is loaded on first
    use and kept.
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        input_shape: tuple[int, ...],
        client_sizes: np.ndarray,
        load_client: Callable[[int], Pair],
        load_test: Callable[[], Pair],
        cache_clients: int = 0,
    ):
        self.name = name
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.client_sizes = np.asarray(client_sizes, dtype=np.int64)
        self.num_clients = len(self.client_sizes)
        self._load_client = load_client
        self._load_test = load_test
        self._test: Pair | None = None
        self._cache: OrderedDict[int, Pair] = OrderedDict()
        self._cache_size = cache_clients

    def client(self, cid: int) -> Pair:
        cid = int(cid)
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range 0..{self.num_clients - 1}")
        if self._cache_size <= 0:
            return self._load_client(cid)
        hit = self._cache.get(cid)
        if hit is not None:
            self._cache.move_to_end(cid)
            return hit
        pair = self._load_client(cid)
        self._cache[cid] = pair
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)  # least recently used
        return pair

    @property
    def test(self) -> Pair:
        if self._test is None:
            self._test = self._load_test()
        return self._test

    @property
    def num_train(self) -> int:
        return int(self.client_sizes.sum())

    def __repr__(self) -> str:
        return (
            f"FederatedDataset({self.name}, clients={self.num_clients}, classes={self.num_classes}, "
            f"input_shape={self.input_shape}, train={self.num_train})"
        )


def in_memory(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    parts: list[np.ndarray],
    num_classes: int,
    to_input: Callable[[np.ndarray], np.ndarray] | None = None,
) -> FederatedDataset:
    """A dataset whose clients are the index lists ``parts`` into the training arrays.

    ``to_input`` (e.g. uint8 images -> normalised float32) is applied after the gather, so the
    large float copy is made once, already in client order.
    """
    X, y = train
    convert = to_input or (lambda a: a)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    # One gather into client order (one copy), then zero-copy contiguous slices per client.
    order = np.concatenate(parts) if parts else np.empty(0, np.int64)
    Xt, yt = _tensors(convert(X[order]), y[order])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    clients = [(Xt[a:b], yt[a:b]) for a, b in itertools.pairwise(bounds)]
    test_pair = _tensors(convert(test[0]), test[1])
    return FederatedDataset(
        name=name,
        num_classes=num_classes,
        input_shape=X.shape[1:],
        client_sizes=sizes,
        load_client=clients.__getitem__,
        load_test=lambda: test_pair,
    )


def _partition(cfg: DataConfig, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    return partition.by_name(
        cfg.partition,
        labels,
        cfg.num_clients,
        numpy_generator(seed, "partition"),
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
    )


def _pooled(
    cfg: DataConfig, name: str, Xy: tuple, num_classes: int, seed: int, to_input=None
) -> FederatedDataset:
    X_tr, y_tr, X_te, y_te = Xy
    parts = _partition(cfg, y_tr, seed)
    return in_memory(name, (X_tr, y_tr), (X_te, y_te), parts, num_classes, to_input)


def _synthetic(cfg: DataConfig, seed: int) -> FederatedDataset:
    users = synthetic.SyntheticUsers(cfg.num_clients, cfg.synthetic_alpha, cfg.synthetic_beta, seed)
    if cfg.partition != "natural":  # pool every user's train part, then re-partition
        return _pooled(cfg, "synthetic", (*users.pooled_train(), *users.test()), synthetic.NUM_CLASSES, seed)
    return FederatedDataset(
        name="synthetic",
        num_classes=synthetic.NUM_CLASSES,
        input_shape=synthetic.INPUT_SHAPE,
        client_sizes=users.train_sizes,
        load_client=lambda cid: _tensors(*users.train(cid)),
        load_test=lambda: _tensors(*users.test()),
        cache_clients=LAZY_CACHE_CLIENTS,
    )


def _h5(cfg: DataConfig, seed: int) -> FederatedDataset:
    from hpcfed.data import h5  # h5py only when an HDF5 dataset is asked for

    natural = cfg.partition == "natural"
    train = h5.H5Clients(cfg.path, "data.path", limit=cfg.num_clients if natural else None)
    test = h5.H5Clients(cfg.test_path, "data.test_path")
    h5.check_compatible(train, test)
    k = h5.num_classes(train, test)
    train.label_limit = test.label_limit = k
    if not natural:  # pool every train client, then re-partition
        X, y = train.read_all()
        train.close()
        return in_memory("h5", (X, y), test.read_all(), _partition(cfg, y, seed), k)
    return FederatedDataset(
        name="h5",
        num_classes=k,
        input_shape=train.input_shape,
        client_sizes=train.sizes,
        load_client=lambda cid: _tensors(*train.read(cid)),
        load_test=lambda: _tensors(*test.read_all()),
    )


def load_federated(cfg: DataConfig, seed: int) -> FederatedDataset:
    """The federated dataset of ``cfg`` for job seed ``seed`` (identical on every rank)."""
    if cfg.dataset == "digits":
        return _pooled(cfg, "digits", digits.load(seed), digits.NUM_CLASSES, seed)
    if cfg.dataset == "synthetic":
        return _synthetic(cfg, seed)
    if cfg.dataset == "h5":
        return _h5(cfg, seed)
    tv = torchvision_local
    if cfg.dataset == "mnist":
        return _pooled(cfg, "mnist", tv.load_mnist(cfg.path), tv.NUM_CLASSES, seed, tv.mnist_inputs)
    if cfg.dataset == "cifar10":
        return _pooled(cfg, "cifar10", tv.load_cifar10(cfg.path), tv.NUM_CLASSES, seed, tv.cifar10_inputs)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")  # unreachable: config.py validates it
