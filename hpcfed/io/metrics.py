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
OPTIONAL_INT = {"rejected_updates", "dropped_clients"}  # further optional columns are float64


def _dtype(name: str):
    return COLUMNS.get(name, np.int64 if name in OPTIONAL_INT else np.float64)


def _fill(name: str):
    return 0 if np.issubdtype(_dtype(name), np.integer) else np.nan


class MetricsLog:
    def __init__(self, path: Path, flush_seconds: float = 1.0):
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()

    def create(self, attrs: dict) -> None:
        with h5py.File(self.path, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            g = f.create_group("metrics")
            for name, dtype in COLUMNS.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))

    def append(self, row: dict, force: bool = False) -> None:
        self.pending.append(row)
        if force or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush(wait=0.0)

    def flush(self, wait: float = 10.0) -> None:
        """Append the pending rows. If a reader holds the file locked, retry for ``wait`` seconds;
        with ``wait = 0`` keep the rows for the next append instead."""
        self.last_flush = time.monotonic()
        if not self.pending:
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

    def truncate(self, rounds_done: int) -> None:
        """Cut every column back to the rows of rounds < rounds_done (resume: each round once)."""
        with h5py.File(self.path, "a", locking=False) as f:
            g = f["metrics"]
            keep = int(np.searchsorted(g["round"][()], rounds_done))
            for name in g:
                g[name].resize((keep,))

    def history(self) -> dict[str, np.ndarray]:
        """All rows, written and pending, as columns (stored in checkpoints to rebuild the log)."""
        with h5py.File(self.path, "r", locking=False) as f:
            cols = {name: f["metrics"][name][()] for name in f["metrics"]}
        for name in set(cols) | {k for r in self.pending for k in r}:
            base = cols.get(name, np.full(len(next(iter(cols.values()))), _fill(name), _dtype(name)))
            extra = np.array([r.get(name, _fill(name)) for r in self.pending], dtype=_dtype(name))
            cols[name] = np.concatenate([base, extra])
        return cols

    def rebuild(self, attrs: dict, history: dict[str, np.ndarray]) -> None:
        """Write a fresh log from a checkpoint's history (the old one was unreadable)."""
        self.create(attrs)
        rows = [dict(zip(history, vals)) for vals in zip(*history.values())]
        self.pending = rows
        self.flush()


def read_metrics(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Attributes and columns of a log; opened without locking, so a live run is never blocked."""
    with h5py.File(path, "r", locking=False) as f:
        attrs = dict(f.attrs)
        cols = {name: f["metrics"][name][()] for name in f["metrics"]}
    return attrs, cols
