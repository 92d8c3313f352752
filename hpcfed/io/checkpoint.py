"""Checkpoints: one HDF5 file per checkpoint, atomic, checksummed, never unpickled.

Layout (interface.md): root attributes ``round`` (rounds completed), ``algorithm``, ``config``;
group ``model/`` with one dataset per ``state_dict`` entry; further groups hold everything else
needed to continue bit for bit (``server/`` optimiser state, ``clients/`` per-client state,
``history/`` the log rows so far, from which ``log.h5`` can be rebuilt).

Written to a temporary name, fsynced, renamed into place and the folder fsynced, so a crash never
leaves a half-written newest checkpoint. Datasets carry HDF5's Fletcher-32 checksum, and the
attribute ``complete`` is written last: a file without it, or whose checksums fail on read, is
skipped in favour of the next newest.

A write that fails (no space, quota, I/O error) removes its temporary file and raises the OSError
with its errno, named after the checkpoint; the bytes go through :class:`storage.GuardedFile`, so
HDF5 never sees the failure (hpcfed/io/storage.py says why). Reads take no HDF5 file lock: a
checkpoint never changes once renamed into place, and some cluster file systems refuse locks.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from hpcfed.config import UserError
from hpcfed.io import storage

_NAME = re.compile(r"^round_(\d{6})\.h5$")


@dataclass
class Checkpoint:
    path: Path
    round: int
    attrs: dict
    model: dict[str, np.ndarray]
    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def checkpoint_path(run_dir: Path, round_done: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{round_done:06d}.h5"


def _write_group(group: h5py.Group, arrays, sink: storage.GuardedFile) -> None:
    """``arrays``: a mapping or an iterable of ``(name, array)`` pairs (per-client state arrives
    as a stream from every rank and is written one array at a time). Stops at the first failed
    write of ``sink`` (the rest would be dropped anyway)."""
    for name, value in arrays.items() if hasattr(arrays, "items") else arrays:
        arr = np.asarray(value)
        # Fletcher-32 needs a chunked, non-empty, non-scalar dataset
        checksum = arr.ndim > 0 and arr.size > 0
        group.create_dataset(name, data=arr, fletcher32=checksum, chunks=True if checksum else None)
        sink.check()


def save_checkpoint(
    run_dir: Path,
    round_done: int,
    attrs: dict,
    model: dict[str, np.ndarray],
    groups: dict[str, dict[str, np.ndarray]],
    keep: int,
) -> Path:
    final = write_checkpoint(checkpoint_path(run_dir, round_done), round_done, attrs, model, groups)
    _prune(final.parent, keep)
    return final


def write_checkpoint(
    final: Path, round_done: int, attrs: dict, model: dict[str, np.ndarray], groups: dict[str, dict]
) -> Path:
    """One checkpoint file at ``final`` (also ``hpcfed export``'s standalone subnets), atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_hdf5(final) as (f, sink):  # temporary name, fsync, rename, fsync folder
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["round"] = round_done
        _write_group(f.create_group("model"), model, sink)
        for gname, arrays in groups.items():
            _write_group(f.create_group(gname), arrays, sink)
        f.attrs["complete"] = True  # last: a torn file lacks it
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run folder, newest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)


def _prune(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder.parent)[keep:]:
        old.unlink(missing_ok=True)


def _read_group(group: h5py.Group) -> dict[str, np.ndarray]:
    return {name: group[name][()] for name in group}


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; raises UserError if it is torn or corrupt."""
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            if not f.attrs.get("complete", False):
                raise UserError(f"{path}: incomplete checkpoint (no completeness marker)")
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            model = _read_group(f["model"])
            groups = {g: _read_group(f[g]) for g in f if g not in ("model", "clients")}
            if "clients" in f:
                # per-client state can be large (ResFed: clients x models): verify every checksum
                # now, one dataset at a time, and let each rank read only its clients later
                for name in f["clients"]:
                    f["clients"][name][()]
                groups["clients"] = LazyGroup(path, "clients", list(f["clients"]))
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as exc:  # checksum mismatch, truncation, not HDF5
        raise UserError(f"{path}: unreadable checkpoint ({exc})") from None
    # model/ holds tensors: numbers only. Strings, opaque bytes (say, a pickle someone stored) or
    # references are never interpreted, and would otherwise fail later, far from this file.
    for name, arr in model.items():
        if arr.dtype.kind not in "biuf":
            raise UserError(f"{path}: model/{name} has dtype {arr.dtype}; expected a numeric tensor")
    return Checkpoint(path=path, round=int(attrs["round"]), attrs=attrs, model=model, groups=groups)


class LazyGroup(Mapping):
    """A checkpoint group whose datasets are read when asked for (the file stays open for reads
    until this object goes away). ``load_checkpoint`` has already verified their checksums."""

    def __init__(self, path: Path, group: str, names: list[str]):
        self.path, self.group, self.names = Path(path), group, names
        self._file: h5py.File | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        if self._file is None:
            self._file = h5py.File(self.path, "r", locking=False)
        return self._file[self.group][name][()]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def load_latest(run_dir: Path) -> Checkpoint:
    """The newest valid checkpoint of a run; torn or corrupt newer ones are skipped with a warning."""
    candidates = list_checkpoints(run_dir)
    for path in candidates:
        try:
            return load_checkpoint(path)
        except UserError as exc:
            warnings.warn(f"skipping {exc}", stacklevel=2)
    raise UserError(f"{Path(run_dir) / 'checkpoints'}: no valid checkpoint to resume from")


def load_state_dict(path: str | os.PathLike) -> dict:
    """The ``model/`` group of a checkpoint as a ``dict[str, torch.Tensor]`` (``strict=True`` loadable)."""
    import torch

    ckpt = load_checkpoint(Path(path))
    return {k: torch.from_numpy(np.array(v)) for k, v in ckpt.model.items()}
