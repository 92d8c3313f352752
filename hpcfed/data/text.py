"""Federated text in HDF5: TFF's ``fed_shakespeare`` and the token files of pfl-research.

``data.dataset = "fed_shakespeare"``: the files of ``tff.simulation.datasets.shakespeare.load_data``
(``fed_shakespeare_train.h5``, ``fed_shakespeare_test.h5``, also FedML's copies), read by TFF's
``HDF5ClientData``. One group per client (a speaking role of a play)::

    examples/<client_id>/snippets   (n,) variable-length strings: the role's lines, one per entry

Each client's snippets become next-character sequences exactly as TFF's baseline preprocessing
does (``tff.simulation.baselines.shakespeare.char_prediction_preprocessing``, itself from the
"Federated Learning for Text Generation" tutorial and McMahan et al. 2017):

* the vocabulary is :data:`CHAR_VOCAB`, 86 characters; a snippet is split into *bytes*
  (``tf.strings.bytes_split``) and each byte looked up: character ``i`` of the vocabulary is id
  ``i + 1``, anything else (a byte of a non-ASCII character, say) is the out-of-vocabulary id 87;
* the special ids (TFF's ``get_special_tokens``): padding 0, out-of-vocabulary 87,
  beginning-of-snippet 88, end-of-snippet 89, so the model has ``num_classes = 90`` outputs;
* a snippet is ``[88] + ids + [89]``, padded with 0 to a multiple of ``sequence_length + 1`` (81)
  and cut into rows of 81: a row never mixes two snippets. Input = the row's first 80 ids,
  target = its last 80 (the next character at every position); padding targets count for
  neither loss nor accuracy (:mod:`hpcfed.losses`).

TFF's shuffling, repetition and batching belong to its training loop and are hpcfed's local
training here. ``data.options.sequence_length`` (default 80) changes the row length. Snippets
must be valid UTF-8 (TFF would accept any bytes; a non-UTF-8 snippet is a corrupt file here).

``data.dataset = "pfl"``: the HDF5 file pfl-research's ``benchmarks/dataset/stackoverflow/
download_preprocess.py`` writes (its readers: ``benchmarks/dataset/stackoverflow/numpy.py``):
one file holding every split, one group per user::

    <split>/<user_id>/inputs     (n, T) int   token ids
    <split>/<user_id>/targets    (n, T) int   the next token at every position (or (n,) labels)
    metadata/vocabulary_size     scalar       number of token ids (the model's outputs)
    metadata/pad_symbol          scalar       padding id (0 in pfl's files)

``data.path`` is that file, ``data.test_path`` the file of the test split (default: the same
file); ``data.options``: ``train_split = "train"``, ``test_split = "test"`` (pfl also writes
``"val"``), ``test_clients`` (use only the first N test users, by sorted id: StackOverflow's test
split holds 200,000), ``num_classes`` (for a file without ``metadata/vocabulary_size``). A
``pad_symbol`` other than 0 is swapped with id 0 in inputs and targets, so padding is id 0 for
the loss. Targets must lie in ``[0, vocabulary_size)``.

Both read lazily, as the ``h5`` loader does: sizes come from a scan at start-up, a client's data
is read when a rank trains it, through one read-only handle per process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpcfed.data.federated import FederatedData
from hpcfed.errors import UserError
from hpcfed.losses import PAD_ID

# TFF's character vocabulary, in TFF's order (the order fixes the ids)
CHAR_VOCAB = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
OOV_ID = len(CHAR_VOCAB) + 1  # 87
BOS_ID = len(CHAR_VOCAB) + 2  # 88
EOS_ID = len(CHAR_VOCAB) + 3  # 89
TFF_VOCAB_SIZE = len(CHAR_VOCAB) + 4  # 90 = pad + 86 characters + oov, bos, eos
SEQUENCE_LENGTH = 80

_BYTE_IDS = np.full(256, OOV_ID, dtype=np.int64)  # byte -> id, as TFF's lookup table of bytes
_BYTE_IDS[[ord(c) for c in CHAR_VOCAB]] = np.arange(1, len(CHAR_VOCAB) + 1)


def _h5py():
    import h5py  # lazily, as in hpcfed.data.h5

    return h5py


def snippet_rows(snippet: bytes, length: int = SEQUENCE_LENGTH) -> np.ndarray:
    """One snippet as TFF's rows of ``length + 1`` ids: ``[bos] + ids + [eos]``, zero-padded."""
    ids = _BYTE_IDS[np.frombuffer(snippet, dtype=np.uint8)]
    rows = -(-(ids.size + 2) // (length + 1))
    out = np.zeros(rows * (length + 1), dtype=np.int64)
    out[0], out[1 : ids.size + 1], out[ids.size + 1] = BOS_ID, ids, EOS_ID
    return out.reshape(rows, length + 1)


def rows_per_snippet(num_bytes: int, length: int = SEQUENCE_LENGTH) -> int:
    return -(-(num_bytes + 2) // (length + 1))


def check_partition(partition: str, dataset: str) -> None:
    """Sequence targets have no single class per sample to split by."""
    if partition in ("dirichlet", "classes"):
        raise UserError(
            f"data.partition = {partition!r} splits by class label; data.dataset = {dataset!r} has a "
            "target per position (sequences): use 'natural' (its own clients) or 'iid'"
        )


class _H5Reader:
    """One HDF5 file: a handle per process, opened on first use (reopened after a fork)."""

    def __init__(self, path: Any, key_name: str):
        self.path, self.key_name = str(path), key_name
        self._handle, self._pid = None, -1
        if not Path(self.path).is_file():
            raise self.fail("no such file")
        if not _h5py().is_hdf5(self.path):
            raise self.fail("not an HDF5 file")

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.key_name} = {self.path}: {what}")

    def file(self):
        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = _h5py().File(self.path, "r")
            except OSError as exc:
                raise self.fail(f"cannot read HDF5 ({exc})") from None
            self._pid = os.getpid()
        return self._handle

    def first_ids(self, group, name: str, limit: int | None, limit_key: str) -> list[str]:
        """The sorted member names of ``group`` (client ids), the first ``limit`` of them."""
        ids = sorted(group.keys())  # names only: cheap even for thousands of clients
        if not ids:
            raise self.fail(f"group {name!r} has no clients")
        if limit is not None and limit > len(ids):
            raise UserError(
                f"{limit_key}: {limit} clients asked for but group {name!r} of {self.key_name} = "
                f"{self.path} holds {len(ids)}; expected at most {len(ids)}"
            )
        return ids[:limit]

    def group(self, name: str, what: str):
        grp = self.file().get(name)
        if not isinstance(grp, _h5py().Group):
            raise self.fail(f"no group {name!r}; expected {what}")
        return grp


def _pooled_or_lazy(
    name: str, partition: str, sizes: np.ndarray, read: Callable[[int], tuple], test: Callable[[], tuple],
    input_shape: tuple[int, ...], num_classes: int,
) -> FederatedData:  # fmt: skip
    if partition != "natural":  # read every client once, here; data.partition splits the pool
        parts = [read(i) for i in range(len(sizes))]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return FederatedData.pooled(train=train, test=test(), num_classes=num_classes, name=name)
    return FederatedData.lazy(
        sizes=sizes, read_client=read, test=test, input_shape=input_shape, num_classes=num_classes, name=name
    )


# --------------------------------------------------------------------------- TFF fed_shakespeare


class ShakespeareH5(_H5Reader):
    """A ``fed_shakespeare`` file: client ids (sorted, as TFF's ``client_ids``), their sizes in
    rows (``limit``: only the first ``limit`` clients are scanned), per-client reads."""

    def __init__(self, path: Any, key_name: str, length: int, limit: int | None = None):
        super().__init__(path, key_name)
        self.length = length
        examples = self.group("examples", "examples/<client_id>/snippets (TFF's fed_shakespeare layout)")
        self.ids = self.first_ids(examples, "examples", limit, "data.num_clients")
        # every snippet is read once here, for its length (and UTF-8 check): the whole of TFF's
        # train file is ~4 MB of text, so the scan is cheap; the rows are made when a client trains
        self.sizes = np.array([self._rows(self._lengths(cid)) for cid in self.ids], np.int64)

    def _snippets(self, cid: str) -> list[bytes]:
        h5py = _h5py()
        grp = self.file()["examples"].get(cid)
        key = f"examples/{cid}/snippets"
        if not isinstance(grp, h5py.Group) or not isinstance(grp.get("snippets"), h5py.Dataset):
            raise self.fail(f"{key} missing; expected a dataset of strings per client")
        ds = grp["snippets"]
        if h5py.check_string_dtype(ds.dtype) is None and ds.dtype.kind not in "SO":
            raise self.fail(f"{key} has dtype {ds.dtype}; expected (variable-length) strings")
        if ds.ndim != 1:
            raise self.fail(f"{key} has shape {ds.shape}; expected one string per snippet, shape (n,)")
        out = []
        for i, s in enumerate(ds[()]):
            raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail(f"{key}[{i}] is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            out.append(raw)
        return out

    def _lengths(self, cid: str) -> list[int]:
        return [len(s) for s in self._snippets(cid)]

    def _rows(self, lengths: list[int]) -> int:
        return sum(rows_per_snippet(n, self.length) for n in lengths)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``i`` (sorted id order) as (inputs, targets), each ``(rows, length)`` int64."""
        snippets = self._snippets(self.ids[i])
        if not snippets:
            empty = np.zeros((0, self.length), np.int64)
            return empty, empty.copy()
        rows = np.concatenate([snippet_rows(s, self.length) for s in snippets])
        return rows[:, :-1].copy(), rows[:, 1:].copy()

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [self.read(i) for i in range(len(self.ids))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_fed_shakespeare(
    seed: int, path: str | None, test_path: str | None, num_clients: int, partition: str,
    sequence_length: int = SEQUENCE_LENGTH,
) -> FederatedData:  # fmt: skip
    """``data.dataset = "fed_shakespeare"`` (see the module docstring)."""
    del seed  # the files and TFF's preprocessing fix everything
    if path is None or test_path is None:
        raise UserError(
            "data.path and data.test_path: dataset 'fed_shakespeare' needs both files "
            "(fed_shakespeare_train.h5 and fed_shakespeare_test.h5)"
        )
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 1:
        raise UserError(f"data.options.sequence_length = {sequence_length!r}: expected a positive integer")
    check_partition(partition, "fed_shakespeare")
    natural = partition == "natural"
    train = ShakespeareH5(path, "data.path", sequence_length, limit=num_clients if natural else None)
    test = ShakespeareH5(test_path, "data.test_path", sequence_length)
    return _pooled_or_lazy(
        "fed_shakespeare",
        partition,
        train.sizes,
        train.read,
        test.read_all,
        (sequence_length,),
        TFF_VOCAB_SIZE,
    )


# --------------------------------------------------------------------------- pfl-research


class PflSplit(_H5Reader):
    """One split of a pfl-research file: user ids (sorted), sizes, per-user reads."""

    def __init__(self, path: Any, key_name: str, split: str, limit: int | None, limit_key: str):
        super().__init__(path, key_name)
        h5py = _h5py()
        users = self.group(split, f"{split}/<user_id>/{{inputs, targets}} (pfl-research's layout)")
        self.split = split
        self.ids = self.first_ids(users, split, limit, limit_key)
        meta = self.file().get("metadata")
        self.vocabulary_size = self.pad = None
        if isinstance(meta, h5py.Group):
            for attr, key in (("vocabulary_size", "vocabulary_size"), ("pad", "pad_symbol")):
                if isinstance(meta.get(key), h5py.Dataset):
                    setattr(self, attr, int(meta[key][()]))
        self.limit_label: int | None = None  # the class count, once known: targets are checked
        sizes = np.empty(len(self.ids), np.int64)
        self.sample_shape: tuple[int, ...] | None = None
        self.target_ndim = 0
        self.input_kind = ""
        for i, uid in enumerate(self.ids):
            grp = users[uid]
            key = f"{split}/{uid}"
            if not isinstance(grp, h5py.Group):
                raise self.fail(f"{key} is not a group; expected {{inputs, targets}} in it")
            for name in ("inputs", "targets"):
                if not isinstance(grp.get(name), h5py.Dataset):
                    raise self.fail(f"{key}/{name} missing; expected datasets 'inputs' and 'targets'")
            x, y = grp["inputs"], grp["targets"]
            if x.dtype.kind not in "iuf" or y.dtype.kind not in "iu":
                raise self.fail(
                    f"{key}: inputs {x.dtype}, targets {y.dtype}; expected numbers and integer targets"
                )
            if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
                raise self.fail(
                    f"{key}: inputs of shape {x.shape} and targets of shape {y.shape}; expected one row each "
                    "per sample"
                )
            if self.sample_shape is None:
                self.sample_shape, self.target_ndim, self.input_kind = (
                    tuple(x.shape[1:]),
                    y.ndim,
                    x.dtype.kind,
                )
            elif (tuple(x.shape[1:]), y.ndim) != (self.sample_shape, self.target_ndim):
                raise self.fail(
                    f"{key}/inputs has rows of shape {tuple(x.shape[1:])} (targets {y.ndim}-D); expected "
                    f"{self.sample_shape} ({self.target_ndim}-D) like the first user (ragged arrays)"
                )
            if y.ndim == 2 and y.shape[1:] != x.shape[1:]:
                raise self.fail(
                    f"{key}: targets {y.shape} do not match inputs {x.shape} position for position"
                )
            if x.shape[0] == 0:
                raise self.fail(f"{key} has no samples; expected at least one per user")
            sizes[i] = x.shape[0]
        self.sizes = sizes

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        uid = self.ids[i]
        key = f"{self.split}/{uid}"
        try:
            grp = self.file()[self.split][uid]
            x, y = np.asarray(grp["inputs"][()]), np.asarray(grp["targets"][()]).astype(np.int64)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise self.fail(f"{key}: cannot read its data ({exc})") from None
        if self.pad not in (None, PAD_ID):  # make the padding id 0, hpcfed's: swap the two ids
            y = _swap(y, self.pad, PAD_ID)
            if x.dtype.kind in "iu":
                x = _swap(x, self.pad, PAD_ID)
        if self.limit_label is not None and y.size and (y.min() < 0 or y.max() >= self.limit_label):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise self.fail(
                f"{key}/targets holds {bad}; expected ids in [0, {self.limit_label}) (the vocabulary)"
            )
        return x, y

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [self.read(i) for i in range(len(self.ids))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _swap(a: np.ndarray, i: int, j: int) -> np.ndarray:
    out = a.copy()
    out[a == i], out[a == j] = j, i
    return out


def load_pfl(
    seed: int, path: str | None, test_path: str | None, num_clients: int, partition: str,
    train_split: str = "train", test_split: str = "test", test_clients: int | None = None,
    num_classes: int | None = None,
) -> FederatedData:  # fmt: skip
    """``data.dataset = "pfl"`` (see the module docstring)."""
    del seed
    if path is None:
        raise UserError("data.path: dataset 'pfl' needs the HDF5 file pfl-research's download script wrote")
    for key, value in (("test_clients", test_clients), ("num_classes", num_classes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"data.options.{key} = {value!r}: expected a positive integer")
    natural = partition == "natural"
    train = PflSplit(path, "data.path", train_split, num_clients if natural else None, "data.num_clients")
    test = PflSplit(test_path or path, "data.test_path" if test_path else "data.path", test_split,
                    test_clients, "data.options.test_clients")  # fmt: skip
    if (train.sample_shape, train.target_ndim) != (test.sample_shape, test.target_ndim):
        raise test.fail(
            f"split {test_split!r} has rows of shape {test.sample_shape}; expected {train.sample_shape} "
            f"as in split {train_split!r}"
        )
    if train.target_ndim >= 2:
        check_partition(partition, "pfl")
    k = num_classes or train.vocabulary_size
    if k is None:
        k = 1 + max(int(t.read(i)[1].max()) for t in (train, test) for i in range(len(t.ids)))
    train.limit_label = test.limit_label = k
    return _pooled_or_lazy("pfl", partition, train.sizes, train.read, test.read_all, train.sample_shape, k)
