"""Federated HDF5 files in the TensorFlow Federated / FedML layout.

TFF's ``tff.simulation.datasets`` (federated EMNIST, CIFAR-100) and FedML's ``fedml.data`` ship
one HDF5 file per split, with one group per client::

    examples/<client_id>/pixels   (N, 28, 28) float   EMNIST: already in [0, 1]
    examples/<client_id>/image    (N, H, W, C) uint8   CIFAR-100
    examples/<client_id>/label    (N,) int

Inputs become float32 channels-first: pixels (N, H, W) -> (N, 1, H, W), image (N, H, W, C) uint8 ->
(N, C, H, W) / 255; labels become int64.

Only metadata (dataset shapes) is read up front, so client sizes are known without loading any
client's data; ``read(i)`` reads that one client's group through a single read-only handle per
process, opened on first use (and reopened after a fork, since HDF5 handles must not cross one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hpcfed.config import UserError

INPUT_KEYS = ("pixels", "image")


def _h5py():
    import h5py  # imported lazily: h5py costs ~50 ms and most runs use the in-memory datasets

    return h5py


def _to_model_input(raw: np.ndarray, key: str) -> np.ndarray:
    """Raw file samples -> float32 model input, channels first (see the module docstring)."""
    if key == "image":
        x = np.asarray(raw)
        scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
        if x.ndim == 4:  # (N, H, W, C) -> (N, C, H, W)
            x = x.transpose(0, 3, 1, 2)
        elif x.ndim == 3:  # grey images without a channel axis
            x = x[:, None]
        return np.ascontiguousarray(x, dtype=np.float32) * np.float32(scale)
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        x = x[:, None]
    return np.ascontiguousarray(x)


def model_input_shape(sample_shape: tuple[int, ...], key: str) -> tuple[int, ...]:
    return _to_model_input(np.zeros((1, *sample_shape), np.uint8), key).shape[1:]


class H5Clients:
    """One TFF-layout file: its client ids (sorted), their sizes, and per-client reads.

    ``limit`` keeps only the first ``limit`` clients in sorted id order (``partition = "natural"``);
    only those are scanned, so a job on 100 of EMNIST's 3,400 writers opens 100 groups, not 3,400.
    Unless the file has a ``num_classes`` root attribute, the scan also reads the (small) label
    datasets of those clients, in the same pass, for ``max_label``.
    """

    def __init__(self, path: str, key_name: str, limit: int | None = None):
        self.path = str(path)
        self.key_name = key_name  # "data.path" or "data.test_path", named in every error
        self._handle = None
        self._pid = -1
        self.label_limit: int | None = None  # the job's class count, once known: labels are checked
        h5py = _h5py()
        if not Path(self.path).is_file():
            raise self._fail("no such file; expected an HDF5 file in the TFF layout")
        if not h5py.is_hdf5(self.path):
            raise self._fail("not an HDF5 file; expected the TFF layout examples/<client_id>/")
        try:
            with h5py.File(self.path, "r") as f:
                self._scan(f, limit)
        except OSError as exc:  # truncated or otherwise unreadable HDF5
            raise self._fail(f"cannot read HDF5 ({exc})") from None

    def _fail(self, what: str) -> UserError:
        return UserError(f"{self.key_name} = {self.path}: {what}")

    def _scan(self, f, limit: int | None) -> None:
        h5py = _h5py()
        examples = f.get("examples")
        if not isinstance(examples, h5py.Group):
            raise self._fail("no group 'examples'; expected examples/<client_id>/{pixels|image, label}")
        ids = sorted(examples.keys())  # names only: cheap even for thousands of clients
        if not ids:
            raise self._fail("group 'examples' has no clients")
        if limit is not None and limit > len(ids):
            raise UserError(
                f"data.num_clients: {limit} clients asked for but {self.key_name} = {self.path} "
                f"holds {len(ids)}; expected at most {len(ids)}"
            )
        self.ids: list[str] = ids[:limit]
        attr = f.attrs.get("num_classes")
        self.num_classes_attr = int(attr) if attr is not None else None
        sizes = np.empty(len(self.ids), np.int64)
        max_label = -1
        self.input_key: str | None = None
        self.sample_shape: tuple[int, ...] = ()
        for i, cid in enumerate(self.ids):
            grp = examples[cid]
            if not isinstance(grp, h5py.Group):
                raise self._fail(f"examples/{cid} is not a group; expected {{pixels|image, label}} in it")
            names = set(grp.keys())
            if "label" not in names:
                raise self._fail(f"examples/{cid} has no dataset 'label'")
            key = next((k for k in INPUT_KEYS if k in names), None)
            if key is None:
                raise self._fail(f"examples/{cid} has neither 'pixels' nor 'image'")
            label, x = grp["label"], grp[key]
            if not (isinstance(label, h5py.Dataset) and isinstance(x, h5py.Dataset)):
                raise self._fail(f"examples/{cid}/label and examples/{cid}/{key} must be datasets")
            if x.dtype.kind not in "fiu":
                raise self._fail(f"examples/{cid}/{key} has dtype {x.dtype}; expected float or integer data")
            if label.dtype.kind not in "iu":
                raise self._fail(f"examples/{cid}/label has dtype {label.dtype}; expected integer labels")
            if self.input_key is None:
                self.input_key, self.sample_shape = key, tuple(x.shape[1:])
            elif (key, tuple(x.shape[1:])) != (self.input_key, self.sample_shape):
                raise self._fail(
                    f"examples/{cid}/{key} has samples of shape {tuple(x.shape[1:])}; expected "
                    f"'{self.input_key}' of shape {self.sample_shape} like the first client"
                )
            n = label.shape[0] if label.ndim else -1
            if x.shape[0] != n or label.ndim > 2 or (label.ndim == 2 and label.shape[1] != 1):
                raise self._fail(
                    f"examples/{cid}: {key} has {x.shape[0]} samples and label has shape {label.shape}; "
                    "expected one label per sample"
                )
            if n == 0:
                raise self._fail(f"examples/{cid} has no samples; expected at least one per client")
            sizes[i] = n
            if self.num_classes_attr is None:
                values = label[()]
                low, high = int(np.min(values)), int(np.max(values))
                if low < 0:
                    raise self._fail(f"examples/{cid}/label holds {low}; expected labels >= 0")
                max_label = max(max_label, high)
        self.sizes = sizes
        self.max_label = max_label

    @property
    def input_shape(self) -> tuple[int, ...]:
        return model_input_shape(self.sample_shape, self.input_key)

    def _file(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle = _h5py().File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def labels(self, i: int) -> np.ndarray:
        y = np.asarray(self._file()["examples"][self.ids[i]]["label"][()]).reshape(-1).astype(np.int64)
        if self.label_limit is not None and y.size and (y.min() < 0 or y.max() >= self.label_limit):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            # a label outside the model's classes would fail deep inside cross-entropy, or worse on GPU
            expected = f"expected labels in [0, {self.label_limit})"
            raise self._fail(f"examples/{self.ids[i]}/label holds {bad}; {expected}")
        return y

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``i`` (in sorted id order): reads only ``examples/<id>/``."""
        cid = self.ids[i]
        try:
            grp = self._file()["examples"][cid]
            return _to_model_input(grp[self.input_key][()], self.input_key), self.labels(i)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # bit rot, wrong dtype, vanished
            # found mid-run on one rank only: the CLI aborts the whole job with exit 2
            raise self._fail(f"examples/{cid}: cannot read its data ({exc})") from None

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [self.read(i) for i in range(len(self.ids))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def num_classes(train: H5Clients, test: H5Clients) -> int:
    """A ``num_classes`` root attribute if either file has one, else max label + 1 over both.

    Without the attribute, "both" means the test file and the train clients in use (all of them,
    or the first ``num_clients`` for ``natural``): the test set of a TFF split covers every class.
    """
    for f in (train, test):
        if f.num_classes_attr is not None:
            return f.num_classes_attr
    return max(train.max_label, test.max_label) + 1


def check_compatible(train: H5Clients, test: H5Clients) -> None:
    if (train.input_key, train.sample_shape) != (test.input_key, test.sample_shape):
        raise UserError(
            f"data.test_path = {test.path}: '{test.input_key}' samples of shape {test.sample_shape}; "
            f"expected '{train.input_key}' of shape {train.sample_shape} as in data.path"
        )


def load_federated(seed: int, path: str, test_path: str, num_clients: int, partition: str):
    """``data.dataset = "h5"``: the file's clients, read lazily; for ``partition = "natural"``
    only the first ``num_clients`` (by sorted id) are even scanned, otherwise all are pooled."""
    from hpcfed.data.federated import FederatedData, as_tensors

    natural = partition == "natural"
    train = H5Clients(path, "data.path", limit=num_clients if natural else None)
    test = H5Clients(test_path, "data.test_path")
    check_compatible(train, test)
    k = num_classes(train, test)
    train.label_limit = test.label_limit = k
    if not natural:  # pool every train client (read once, here), then data.partition splits it
        X, y = train.read_all()
        train.close()
        return FederatedData.pooled(train=(X, y), test=test.read_all(), num_classes=k, name="h5")
    return FederatedData(
        name="h5", num_classes=k, input_shape=train.input_shape, client_sizes=train.sizes,
        load_client=lambda cid: as_tensors(*train.read(cid)), load_test=lambda: as_tensors(*test.read_all()),
        kind="lazy",
    )  # fmt: skip
