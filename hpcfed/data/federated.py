"""``hpcfed.FederatedData``: a federated dataset, from the built-ins or from user code.

A dataset loader (``data.dataset``, built-in or ``"module:load"``) returns one, made by one of
three constructors for the three cases users have:

- :meth:`FederatedData.pooled`: one training set and a test set; ``data.partition``,
  ``data.num_clients`` and ``data.alpha`` then split it into clients (digits, MNIST, CIFAR-10);
- :meth:`FederatedData.from_clients`: the clients themselves, in memory (the natural partition:
  writers, users, devices);
- :meth:`FederatedData.lazy`: client sizes known up front and a reader per client, for data too
  big to hold (only the clients a rank trains are ever read).

Arrays are NumPy arrays or CPU tensors with one sample per row. Inputs become float32 (integer
inputs stay integers: token ids); integer targets are class indices (int64; the task is
classification and accuracy is logged), float targets are regression targets (float32; accuracy
is NaN). The engine turns the loader's result into clients with :func:`hpcfed.data.federate`;
what it trains on is again a ``FederatedData``, of client kind.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from hpcfed.errors import UserError

Pair = tuple[torch.Tensor, torch.Tensor]


def as_tensors(x: Any, y: Any) -> Pair:
    """``(x, y)`` as contiguous CPU tensors of the engine's dtypes (see the module docstring)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    x = np.ascontiguousarray(x, dtype=np.int64 if x.dtype.kind in "iub" else np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64 if y.dtype.kind in "iub" else np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def _check_pair(pair: Any, what: str) -> tuple[Any, Any]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise UserError(f"{what}: expected a pair (x, y), got {type(pair).__name__}")
    x, y = pair
    for name, a in (("x", x), ("y", y)):
        if not hasattr(a, "shape") or len(a.shape) < 1:
            raise UserError(f"{what}: {name} must be a NumPy array or tensor with one sample per row")
    if x.shape[0] != y.shape[0]:
        raise UserError(
            f"{what}: x has {x.shape[0]} rows but y has {y.shape[0]}; expected one target per sample"
        )
    return x, y


def _infer_classes(ys: Sequence[np.ndarray], given: int | None, what: str) -> int:
    if given is not None:
        if int(given) < 1:
            raise UserError(f"{what}: num_classes must be positive (got {given})")
        return int(given)
    y = next((a for a in ys if a.size), None)
    if y is None:
        raise UserError(f"{what}: no targets to infer num_classes from; pass num_classes=")
    if y.dtype.kind in "iub":
        low = min(int(a.min()) for a in ys if a.size)
        if low < 0:
            raise UserError(f"{what}: class labels must be >= 0 (found {low})")
        return max(int(a.max()) for a in ys if a.size) + 1
    return int(np.prod(y.shape[1:])) if y.ndim > 1 else 1  # regression: the output width


class FederatedData:
    """Clients' training data and the shared test set.

    A client-kind dataset (what the engine trains on) has ``num_clients``, ``num_classes``,
    ``input_shape`` (per sample) and ``client_sizes`` (int64, known without loading any client)
    as plain attributes; ``client(cid)`` gives ``(x, y)`` as contiguous CPU tensors; ``test`` is
    loaded on first use and kept. A pooled one holds ``train`` until it is partitioned.
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        input_shape: tuple[int, ...],
        client_sizes: np.ndarray | None,
        load_client: Callable[[int], Pair] | None,
        load_test: Callable[[], Pair],
        cache_clients: int = 0,
        kind: str = "clients",
        train: tuple[Any, Any] | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.name = name
        self.kind = kind  # "pooled" | "clients" (in memory) | "lazy"
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.client_sizes = None if client_sizes is None else np.asarray(client_sizes, dtype=np.int64)
        self.num_clients = 0 if client_sizes is None else len(self.client_sizes)
        self.train = train  # pooled: the training set, split by data.partition
        self.transform = transform  # pooled: applied to x once, after the split
        self._load_client = load_client
        self._load_test = load_test
        self._test: Pair | None = None
        self._cache: OrderedDict[int, Pair] = OrderedDict()
        self._cache_size = cache_clients

    # -- the three constructors (docs/api.md) -----------------------------------------------------
    @classmethod
    def pooled(
        cls,
        train: tuple[Any, Any],
        test: tuple[Any, Any],
        *,
        num_classes: int | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        name: str = "pooled",
    ) -> FederatedData:
        """One training set that ``data.partition`` splits into ``data.num_clients`` clients.

        ``transform`` (NumPy in, NumPy out; e.g. uint8 images to normalised float32) is applied
        to training inputs after the split and to the test inputs, so a compact source dtype is
        expanded only once, already in client order. Labels must be class indices for the
        label-based partitions (dirichlet, classes); iid takes any targets."""
        x, y = _check_pair(train, "FederatedData.pooled(train=...)")
        tx, ty = _check_pair(test, "FederatedData.pooled(test=...)")
        x, y, tx, ty = (
            a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in (x, y, tx, ty)
        )
        k = _infer_classes([y, ty], num_classes, "FederatedData.pooled")
        convert = transform or (lambda a: a)
        test_pair = as_tensors(convert(tx), ty)
        shape = tuple(test_pair[0].shape[1:]) if transform else tuple(x.shape[1:])
        return cls(
            name=name, num_classes=k, input_shape=shape, client_sizes=None, load_client=None,
            load_test=lambda: test_pair, kind="pooled", train=(x, y), transform=transform,
        )  # fmt: skip

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[tuple[Any, Any]],
        test: tuple[Any, Any],
        *,
        num_classes: int | None = None,
        name: str = "clients",
    ) -> FederatedData:
        """The clients themselves, ``[(x, y), ...]`` in client-id order (the natural partition)."""
        if not isinstance(clients, Sequence) or not clients:
            raise UserError(
                "FederatedData.from_clients(clients=...): expected a non-empty list of (x, y) pairs"
            )
        pairs = [
            as_tensors(*_check_pair(c, f"FederatedData.from_clients: client {i}"))
            for i, c in enumerate(clients)
        ]
        test_pair = as_tensors(*_check_pair(test, "FederatedData.from_clients(test=...)"))
        shapes = {tuple(x.shape[1:]) for x, _ in pairs} | {tuple(test_pair[0].shape[1:])}
        if len(shapes) > 1:
            raise UserError(f"FederatedData.from_clients: samples of different shapes {sorted(shapes)}")
        k = _infer_classes(
            [y.numpy() for _, y in pairs] + [test_pair[1].numpy()], num_classes, "FederatedData.from_clients"
        )
        return cls(
            name=name, num_classes=k, input_shape=tuple(test_pair[0].shape[1:]),
            client_sizes=np.array([y.shape[0] for _, y in pairs]), load_client=pairs.__getitem__,
            load_test=lambda: test_pair,
        )  # fmt: skip

    @classmethod
    def lazy(
        cls,
        sizes: Sequence[int],
        read_client: Callable[[int], tuple[Any, Any]],
        test: tuple[Any, Any] | Callable[[], tuple[Any, Any]],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        cache_clients: int = 0,
        name: str = "lazy",
    ) -> FederatedData:
        """Clients read on demand: ``read_client(cid) -> (x, y)`` with ``sizes[cid]`` samples.

        ``test`` is a pair or a function returning one (read on first use). ``cache_clients``
        keeps that many recently read clients in memory (least recently used out)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.ndim != 1 or sizes.size == 0 or (sizes < 0).any():
            raise UserError("FederatedData.lazy(sizes=...): expected a non-empty list of client sizes >= 0")
        if not callable(read_client):
            raise UserError("FederatedData.lazy(read_client=...): expected a function cid -> (x, y)")

        def load_client(cid: int) -> Pair:
            pair = as_tensors(*_check_pair(read_client(cid), f"FederatedData.lazy: read_client({cid})"))
            if pair[1].shape[0] != sizes[cid]:
                raise UserError(
                    f"FederatedData.lazy: read_client({cid}) gave {pair[1].shape[0]} samples; "
                    f"sizes[{cid}] = {sizes[cid]}"
                )
            return pair

        def load_test() -> Pair:
            return as_tensors(
                *_check_pair(test() if callable(test) else test, "FederatedData.lazy(test=...)")
            )

        return cls(
            name=name, num_classes=num_classes, input_shape=tuple(input_shape), client_sizes=sizes,
            load_client=load_client, load_test=load_test, cache_clients=cache_clients, kind="lazy",
        )  # fmt: skip

    # -- use ---------------------------------------------------------------------------------------
    def client(self, cid: int) -> Pair:
        if self.kind == "pooled":
            raise TypeError("a pooled FederatedData has no clients until data.partition splits it")
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
        return int(self.client_sizes.sum()) if self.client_sizes is not None else len(self.train[1])

    @property
    def is_classification(self) -> bool:
        return not self.test[1].is_floating_point()

    def fingerprint(self, samples: int = 8) -> str:
        """A digest of what makes this dataset: sizes, shapes, the test set and (in memory) a few
        clients spread over the id range; lazy clients are not read for it (start-up reads no
        client). Ranks compare it once at start-up: a loader that is not a pure function of the
        seed (an unseeded shuffle, say) gives different digests."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.kind, self.num_classes, self.input_shape, self.num_clients)).encode())
        if self.client_sizes is not None:
            h.update(self.client_sizes.tobytes())
        for t in self.test:
            h.update(t.numpy().tobytes())
        ids = np.unique(np.linspace(0, max(self.num_clients - 1, 0), samples).astype(np.int64))
        for cid in ids if self.num_clients and self.kind == "clients" else ():
            for t in self.client(int(cid)):
                h.update(t.numpy().tobytes())
        if self.kind == "pooled":
            for a in self.train:
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"FederatedData({self.name}, {self.kind}, clients={self.num_clients}, "
            f"classes={self.num_classes}, input_shape={self.input_shape}, train={self.num_train})"
        )


def in_memory(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test_pair: Pair,
    parts: list[np.ndarray],
    num_classes: int,
    to_input: Callable[[np.ndarray], np.ndarray] | None = None,
) -> FederatedData:
    """A dataset whose clients are the index lists ``parts`` into the training arrays.

    ``to_input`` (e.g. uint8 images -> normalised float32) is applied after the gather, so the
    large float copy is made once, already in client order.
    """
    X, y = train
    convert = to_input or (lambda a: a)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    # One gather into client order (one copy), then zero-copy contiguous slices per client.
    order = np.concatenate(parts) if parts else np.empty(0, np.int64)
    Xt, yt = as_tensors(convert(X[order]), y[order])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    clients = [(Xt[a:b], yt[a:b]) for a, b in itertools.pairwise(bounds)]
    return FederatedData(
        name=name,
        num_classes=num_classes,
        input_shape=Xt.shape[1:],
        client_sizes=sizes,
        load_client=clients.__getitem__,
        load_test=lambda: test_pair,
    )
