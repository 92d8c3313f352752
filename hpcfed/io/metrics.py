"""``log.h5``: per-round metrics as 1-D resizable datasets (interface.md's schema).

Rows are buffered in memory and appended in batches: at every evaluation, checkpoint and stop,
and otherwise at most ``flush_seconds`` after the oldest unwritten row. Keeping HDF5 off every
round keeps it off the round's critical path.

An append never changes the file in place: it changes an in-memory copy and renames that over
``log.h5`` (hpcfed/io/storage.py; a few ms for a 10 000-row log). So between appends ``log.h5`` is
a plain closed HDF5 file that any reader can open while the run is alive, a reader never sees a
half-written one, and an append that fails (disk full, quota, I/O error) leaves the file exactly
as it was, its rows kept pending for the next append (which the next checkpoint's ``history/``
also holds). A killed writer loses at most the unflushed rows.

A reader holding the file open (HDF5 file locking) must not crash the run: the writer takes an
exclusive ``flock`` first, and an append that finds the file locked keeps its rows pending for the
next one; a final append (checkpoint, end) waits a few seconds and then writes without the lock.
hpcfed's own readers open without locking, so they never block the writer. A file system that
refuses locks gets one warning, and the writer goes on without them.

Optional column ``checkpoint_skipped`` (int64): 1 on the row of a round whose checkpoint could
not be written for lack of space and was skipped (:meth:`MetricsLog.note`), else 0.
"""

from __future__ import annotations

import io
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from hpcfed.io import storage

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
OPTIONAL_INT = {"rejected_updates", "dropped_clients", "slow_clients", "checkpoint_skipped"}  # else float64
CHUNK = 256  # rows per chunk of a column (2 KiB: a short run's log stays small)


class UnusableLog(ValueError):
    """The log cannot be read or does not hold what it should (the caller rebuilds it)."""


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
        self.notes: dict[tuple[str, int], int | float] = {}  # (column, round) -> value, set at the next flush
        self.error: OSError | None = None  # why the last append failed (rows kept pending), else None
        self.last_flush = time.monotonic()

    def create(self, attrs: dict, groups: dict[str, dict] | None = None) -> None:
        """A fresh log; ``groups``: an algorithm's own groups and their attributes (e.g. SuperFed's
        ``family/``), whose rows :meth:`append_group` adds per evaluation."""
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            g = f.create_group("metrics")
            for name, dtype in COLUMNS.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK,))
            for name, group_attrs in (groups or {}).items():
                f.create_group(name).attrs.update(group_attrs)
        storage.replace_file(self.path, image.getbuffer())

    @contextmanager
    def _rewrite(self, locking: bool, durable: bool):
        """The log as an h5py file in memory; when the block ends, it replaces ``log.h5`` (atomic).
        ``locking``: hold an exclusive flock on the current file meanwhile (BlockingIOError if a
        reader holds it). Reading failures raise :class:`UnusableLog`; storage failures OSError."""
        with open(self.path, "rb+") as current:
            if locking:
                storage.lock_exclusive(current.fileno(), self.path)
            image = io.BytesIO(current.read())
            try:
                f = h5py.File(image, "r+")
            except (OSError, ValueError) as exc:
                raise UnusableLog(f"{self.path}: not a readable HDF5 file ({exc})") from None
            with f:
                yield f
            storage.replace_file(self.path, image.getbuffer(), durable=durable)

    def note(self, round_index: int, column: str, value: int | float = 1) -> None:
        """Set ``column`` on the row of ``round_index`` (written or pending) at the next flush."""
        self.notes[(column, round_index)] = value

    def append_group(self, group: str, round_index: int, values: dict[str, np.ndarray]) -> None:
        """One evaluation's row of ``group``: a dataset ``round`` and one [rows × k] dataset per
        value; written with the next flush of the metrics (the same round's row forces one)."""
        self.pending_groups.append((group, {"round": round_index, **values}))

    def append(self, row: dict, force: bool = False) -> None:
        self.pending.append(row)
        if force or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush(wait=0.0)

    def flush(self, wait: float = 10.0, strict: bool = False) -> None:
        """Append the pending rows. If a reader holds the file locked, retry for ``wait`` seconds;
        with ``wait = 0`` keep the rows for the next append instead. A storage failure (disk full,
        quota, I/O error) leaves the file as it was and keeps the rows pending; ``strict`` raises
        it (the checkpoint's append), otherwise it is kept in :attr:`error` (appends mid-round,
        and the last-chance flush of a run that is already failing)."""
        self.last_flush = time.monotonic()
        if not self.pending and not self.pending_groups and not self.notes:
            return
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    self._write(self.pending, locking=True, durable=wait > 0)
                    break
                except BlockingIOError:
                    if wait == 0.0:
                        return  # rows stay pending
                    if time.monotonic() >= deadline:
                        msg = f"{self.path} stayed locked by a reader; appending without the lock"
                        warnings.warn(msg, stacklevel=2)
                        self._write(self.pending, locking=False, durable=True)
                        break
                    time.sleep(0.05)
        except OSError as exc:
            if not storage.is_storage(exc):
                raise
            self.error = exc
            if strict:
                raise
            return  # rows stay pending
        self.pending = []
        self.pending_groups = []
        self.notes = {}
        self.error = None

    def _write(self, rows: list[dict], locking: bool, durable: bool) -> None:
        with self._rewrite(locking, durable) as f:
            g = f["metrics"]
            n_old = g["round"].shape[0]
            names = set(g) | {k for r in rows for k in r} | {name for name, _ in self.notes}
            for name in names:
                if name not in g:  # an optional column appearing late is back-filled
                    g.create_dataset(
                        name,
                        data=np.full(n_old, _fill(name), _dtype(name)),
                        maxshape=(None,),
                        chunks=(CHUNK,),
                    )
                column = np.array([r.get(name, _fill(name)) for r in rows], dtype=_dtype(name))
                ds = g[name]
                ds.resize((n_old + len(rows),))
                ds[n_old:] = column
            rounds = g["round"][()]
            for (name, rnd), value in self.notes.items():
                at = np.flatnonzero(rounds == rnd)
                if at.size:
                    g[name][at[-1]] = value
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

        Raises ValueError (:class:`UnusableLog`) if the log cannot be read or does not hold exactly
        rounds 0..rounds_done-1 by then (rows lost to a killed writer, columns of unequal length):
        the caller rebuilds it instead. A failure to write the cut log is an OSError."""
        with self._rewrite(locking=False, durable=True) as f:
            if "metrics" not in f or "round" not in f["metrics"]:
                raise UnusableLog(f"{self.path}: no metrics/round")
            g = f["metrics"]
            rounds = g["round"][()]
            keep = int(np.searchsorted(rounds, rounds_done))
            if not np.array_equal(rounds[:keep], np.arange(rounds_done)):
                raise UnusableLog(
                    f"{self.path}: holds {keep} rows before round {rounds_done}, not rounds 0.."
                )
            if any(g[name].shape[0] < keep for name in g):
                raise UnusableLog(f"{self.path}: columns of unequal length")
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
        for name in set(metric_names) | {k for r in self.pending for k in r} | {n for n, _ in self.notes}:
            base = cols.get(name, np.full(len(cols[metric_names[0]]), _fill(name), _dtype(name)))
            extra = np.array([r.get(name, _fill(name)) for r in self.pending], dtype=_dtype(name))
            cols[name] = np.concatenate([base, extra])
        for (name, rnd), value in self.notes.items():
            at = np.flatnonzero(cols["round"] == rnd)
            if at.size:
                cols[name][at[-1]] = value
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
