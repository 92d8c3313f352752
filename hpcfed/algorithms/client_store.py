"""Per-client state owned by the client's home rank: a small dict-like store, in memory or on disk.

Used by ResFed (each client's trajectories of reconstructed models, at both ends of its link) and
meant for any method whose clients keep state between rounds. A client's state is a flat
``dict[str, np.ndarray]``; the store maps client ids to such dicts:

    store[cid] = {"down.server": array, ...}   # write back after the client's round
    state = store.get(cid, {})                 # a fresh copy: mutate it freely
    for cid in store: ...                      # this rank's clients, ascending

``MemoryStore`` keeps the dicts on the heap. ``HDF5Store`` keeps them in one HDF5 file per rank
(one group per client, one dataset per entry), so only the clients being trained are in memory:
the round loop reads a client, works on it, writes it back. The file is scratch space, created
under ``$TMPDIR`` (node-local on most clusters) and unlinked at once, so it disappears with the
process and two runs never collide; resuming reads the checkpoint, never this file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import h5py
import numpy as np


class MemoryStore:
    """Client id -> dict of arrays, on the heap."""

    def __init__(self) -> None:
        self._data: dict[int, dict[str, np.ndarray]] = {}

    def get(self, cid: int, default=None) -> dict[str, np.ndarray] | None:
        state = self._data.get(int(cid))
        return default if state is None else {k: v.copy() for k, v in state.items()}

    def __setitem__(self, cid: int, state: dict[str, np.ndarray]) -> None:
        self._data[int(cid)] = {k: np.array(v) for k, v in state.items()}

    def __contains__(self, cid: int) -> bool:
        return int(cid) in self._data

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()

    def close(self) -> None:
        self.clear()


class HDF5Store:
    """Client id -> dict of arrays, in an unlinked HDF5 scratch file (one per rank).

    Datasets are uncompressed and contiguous: a client's trajectories are read and written whole
    each round, and the file is never the durable copy (checkpoints are).
    """

    def __init__(self, folder: str | os.PathLike | None = None, prefix: str = "hpcfed-clients-") -> None:
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".h5", dir=folder)
        os.close(fd)
        self._file = h5py.File(path, "w", locking=False)
        self.path = path
        os.unlink(path)  # POSIX: the open file lives on until closed; nothing is left behind

    def get(self, cid: int, default=None) -> dict[str, np.ndarray] | None:
        name = str(int(cid))
        if name not in self._file:
            return default
        group = self._file[name]
        return {k: group[k][()] for k in group}

    def __setitem__(self, cid: int, state: dict[str, np.ndarray]) -> None:
        name = str(int(cid))
        if name in self._file:
            group = self._file[name]
            for key in list(group):
                if key not in state:
                    del group[key]
        else:
            group = self._file.create_group(name)
        for key, value in state.items():
            value = np.asarray(value)
            if key in group and group[key].shape == value.shape and group[key].dtype == value.dtype:
                group[key][...] = value  # same shape: overwrite in place, no new allocation in the file
            else:
                if key in group:
                    del group[key]
                group.create_dataset(key, data=value)

    def __contains__(self, cid: int) -> bool:
        return str(int(cid)) in self._file

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(int(k) for k in self._file))

    def __len__(self) -> int:
        return len(self._file)

    def clear(self) -> None:
        for key in list(self._file):
            del self._file[key]

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass


def make_store(kind: str) -> MemoryStore | HDF5Store:
    """``"memory"`` or ``"disk"`` (an HDF5 file per rank under ``$TMPDIR``)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "disk":
        return HDF5Store()
    raise ValueError(f"unknown client-state store {kind!r}; expected 'memory' or 'disk'")
