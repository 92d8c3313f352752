"""``log.h5``: per-round metrics as 1-D resizable datasets (interface.md's schema).

Rows are buffered in memory and appended in batches: at every evaluation, checkpoint and stop,
and otherwise at most ``flush_seconds`` after the oldest unwritten row. The file is opened only
for the append and closed straight after, so between appends it is a plain closed HDF5 file that
any reader can open while the run is alive, and a killed writer loses at most the unflushed rows
(which the next checkpoint's ``history/`` also holds). Keeping HDF5 off every round keeps it off
the round's critical path.

A reader holding the file open (HDF5 file locking) must not crash the run: an append that finds
the file locked keeps its rows pending for the next one, and a final append (checkpoint, end) waits
a few seconds and then writes without the lock. hpcfed's own readers open without locking, so they
never block the writer.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import h5py
import numpy as np

COLUMNS = {
    "round": np.int64,
    "test_accuracy": np.float64,
    "test_loss": np.float64,
    "train_loss": np.float64,
    "bytes_up": np.int64,
    "bytes_down": np.int64,
    "wall_time": np.float64,
    "sim_time": np.float64,
}
OPTIONAL_INT = {"rejected_updates", "dropped_clients", "slow_clients"}  # further optional: float64


def _dtype(name: str):
    return COLUMNS.get(name, np.int64 if name in OPTIONAL_INT else np.float64)


def _fill(name: str):
    return 0 if np.issubdtype(_dtype(name), np.integer) else np.nan


class MetricsLog:
    def __init__(self, path: Path, flush_seconds: float = 1.0):
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self.pending: list[dict] = []
        self.pending_groups: list[tuple[str, dict]] = []  # (group, one evaluation's row)
        self.last_flush = time.monotonic()

    def create(self, attrs: dict, groups: dict[str, dict] | None = None) -> None:
        """A fresh log; ``groups``: an algorithm's own groups and their attributes (e.g. SuperFed's
        ``family/``), whose rows :meth:`append_group` adds per evaluation."""
        with h5py.File(self.path, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            g = f.create_group("metrics")
            for name, dtype in COLUMNS.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
            for name, group_attrs in (groups or {}).items():
                f.create_group(name).attrs.update(group_attrs)

    def append_group(self, group: str, round_index: int, values: dict[str, np.ndarray]) -> None:
        """One evaluation's row of ``group``: a dataset ``round`` and one [rows × k] dataset per
        value; written with the next flush of the metrics (the same round's row forces one)."""
        self.pending_groups.append((group, {"round": round_index, **values}))

    def append(self, row: dict, force: bool = False) -> None:
        self.pending.append(row)
        if force or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush(wait=0.0)

    def flush(self, wait: float = 10.0) -> None:
        """Append the pending rows. If a reader holds the file locked, retry for ``wait`` seconds;
        with ``wait = 0`` keep the rows for the next append instead."""
        self.last_flush = time.monotonic()
        if not self.pending and not self.pending_groups:
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                self._write(self.pending, locking=True)
                break
            except BlockingIOError:
                if wait == 0.0:
                    return  # rows stay pending
                if time.monotonic() >= deadline:
                    msg = f"{self.path} stayed locked by a reader; appending without the lock"
                    warnings.warn(msg, stacklevel=2)
                    self._write(self.pending, locking=False)
                    break
                time.sleep(0.05)
        self.pending = []
        self.pending_groups = []

    def _write(self, rows: list[dict], locking: bool) -> None:
        with h5py.File(self.path, "a", locking=locking) as f:
            g = f["metrics"]
            n_old = g["round"].shape[0]
            names = set(g) | {k for r in rows for k in r}
            for name in names:
                if name not in g:  # an optional column appearing late is back-filled
                    g.create_dataset(
                        name, data=np.full(n_old, _fill(name), _dtype(name)), maxshape=(None,), chunks=(1024,)
                    )
                column = np.array([r.get(name, _fill(name)) for r in rows], dtype=_dtype(name))
                ds = g[name]
                ds.resize((n_old + len(rows),))
                ds[n_old:] = column
            for group, row in self.pending_groups:
                grp = f.require_group(group)
                for name, value in row.items():
                    arr = np.asarray(value, dtype=np.int64 if name == "round" else np.float64)
                    if name not in grp:
                        shape = (0, *arr.shape)
                        grp.create_dataset(name, shape=shape, maxshape=(None, *arr.shape), dtype=arr.dtype)
                    ds = grp[name]
                    ds.resize(ds.shape[0] + 1, axis=0)
                    ds[-1] = arr

    def truncate(self, rounds_done: int) -> None:
        """Cut every column back to the rows of rounds < rounds_done (resume: each round once).

        Raises ValueError if the log does not hold exactly rounds 0..rounds_done-1 by then (rows
        lost to a killed writer, columns of unequal length): the caller rebuilds it instead."""
        with h5py.File(self.path, "a", locking=False) as f:
            g = f["metrics"]
            rounds = g["round"][()]
            keep = int(np.searchsorted(rounds, rounds_done))
            if not np.array_equal(rounds[:keep], np.arange(rounds_done)):
                raise ValueError(f"{self.path}: holds {keep} rows before round {rounds_done}, not rounds 0..")
            if any(g[name].shape[0] < keep for name in g):
                raise ValueError(f"{self.path}: columns of unequal length")
            for name in g:
                g[name].resize((keep,))
            for grp in _row_groups(f):  # e.g. family/: rows of evaluations, each with its round
                cut = int(np.searchsorted(grp["round"][()], rounds_done))
                for name in grp:
                    grp[name].resize(cut, axis=0)

    def history(self) -> dict[str, np.ndarray]:
        """All rows, written and pending, as columns (stored in checkpoints to rebuild the log).
        Rows of an algorithm's group come as ``"{group}.{dataset}"`` (e.g. ``family.accuracy``)."""
        with h5py.File(self.path, "r", locking=False) as f:
            cols = {name: f["metrics"][name][()] for name in f["metrics"]}
            for grp in _row_groups(f):
                group = grp.name.lstrip("/")
                cols.update({f"{group}.{name}": grp[name][()] for name in grp})
        metric_names = [k for k in cols if "." not in k]
        for name in set(metric_names) | {k for r in self.pending for k in r}:
            base = cols.get(name, np.full(len(cols[metric_names[0]]), _fill(name), _dtype(name)))
            extra = np.array([r.get(name, _fill(name)) for r in self.pending], dtype=_dtype(name))
            cols[name] = np.concatenate([base, extra])
        for group, row in self.pending_groups:
            for name, value in row.items():
                key, arr = f"{group}.{name}", np.asarray(value)[None]
                cols[key] = np.concatenate([cols[key], arr.astype(cols[key].dtype)]) if key in cols else arr
        return cols

    def rebuild(self, attrs: dict, history: dict[str, np.ndarray], groups: dict | None = None) -> None:
        """Write a fresh log from a checkpoint's history (the old one was unreadable)."""
        self.create(attrs, groups)
        columns = {k: v for k, v in history.items() if "." not in k}
        self.pending = [dict(zip(columns, vals)) for vals in zip(*columns.values())]
        by_group: dict[str, dict[str, np.ndarray]] = {}
        for key, arr in history.items():
            if "." in key:
                group, name = key.split(".", 1)
                by_group.setdefault(group, {})[name] = arr
        self.pending_groups = [
            (group, {name: arr[i] for name, arr in data.items()})
            for group, data in by_group.items()
            for i in range(len(data["round"]))
        ]
        self.flush()


def _row_groups(f: h5py.File) -> list[h5py.Group]:
    """The groups beside ``metrics/`` that hold per-evaluation rows (a ``round`` dataset)."""
    return [f[k] for k in f if k != "metrics" and isinstance(f[k], h5py.Group) and "round" in f[k]]


def read_metrics(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Attributes and columns of a log; opened without locking, so a live run is never blocked."""
    with h5py.File(path, "r", locking=False) as f:
        attrs = dict(f.attrs)
        cols = {name: f["metrics"][name][()] for name in f["metrics"]}
    return attrs, cols
