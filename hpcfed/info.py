"""``hpcfed info``: a short summary of a run folder, a log.h5 or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from hpcfed.config import UserError


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _describe_log(path: Path) -> list[str]:
    from hpcfed.io.metrics import read_metrics

    attrs, cols = read_metrics(path)
    rounds = len(cols["round"])
    lines = [
        f"algorithm      {attrs.get('algorithm', '?')}",
        f"rounds done    {rounds}",
        f"world size     {attrs.get('world_size', '?')}",
        f"seed           {attrs.get('seed', '?')}",
    ]
    if rounds:
        acc = cols["test_accuracy"]
        evaluated = np.flatnonzero(~np.isnan(acc))
        if evaluated.size:
            last = evaluated[-1]
            lines.append(f"test accuracy  {acc[last]:.4f} (round {int(cols['round'][last]) + 1})")
            lines.append(f"test loss      {cols['test_loss'][last]:.4f}")
        lines.append(f"train loss     {cols['train_loss'][-1]:.4f} (last round)")
        lines.append(f"bytes up       {int(cols['bytes_up'].sum()):,} total")
        lines.append(f"bytes down     {int(cols['bytes_down'].sum()):,} total")
        lines.append(f"wall time      {cols['wall_time'][-1]:.2f} s")
        for name in ("epsilon", "rejected_updates", "dropped_clients"):
            if name in cols:
                lines.append(f"{name:<14} {cols[name][-1]}")
    lines.append(f"log            {path} ({_size(path)})")
    return lines


def _describe_checkpoint(path: Path) -> list[str]:
    from hpcfed.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    params = sum(int(np.asarray(v).size) for v in ckpt.model.values())
    return [
        f"checkpoint     {path} ({_size(path)})",
        f"algorithm      {ckpt.attrs.get('algorithm', '?')}",
        f"rounds done    {ckpt.round}",
        f"model          {len(ckpt.model)} tensors, {params:,} values",
        f"other groups   {', '.join(sorted(ckpt.groups)) or '-'}",
    ]


def describe(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        log = path / "log.h5"
        if not log.is_file():
            raise UserError(f"{log}: not found; is {path} an hpcfed run folder?")
        lines = [f"run folder     {path}", *_describe_log(log)]
        from hpcfed.io.checkpoint import list_checkpoints

        ckpts = list_checkpoints(path)
        lines.append(f"checkpoints    {len(ckpts)}" + (f", newest {ckpts[0].name}" if ckpts else ""))
        return "\n".join(lines)
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    try:
        with h5py.File(path, "r", locking=False) as f:
            is_log = "metrics" in f
    except OSError:
        raise UserError(f"{path}: not an HDF5 file") from None
    return "\n".join(_describe_log(path) if is_log else _describe_checkpoint(path))
