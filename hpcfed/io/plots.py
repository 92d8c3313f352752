"""``hpcfed plot``: several runs' ``log.h5`` on one figure (interface.md, "log.h5").

Panels, left to right:

1. test accuracy against round;
2. test accuracy against cumulative bytes sent (``bytes_up + bytes_down`` summed over the rounds so
   far), log x: what compression buys;
3. if any run's ``algorithm`` is ``"hadfl"``: test accuracy against ``sim_time``, the simulated
   time of the heterogeneous system (every run is drawn there; for the others it is wall time);
4. if any log has a ``family/`` group (SuperFed): the last evaluation's accuracy of each subnet
   against its MACs, log x: the accuracy-efficiency front.

Rounds that were not evaluated (NaN accuracy) are skipped. The legend is the run folder's name.
matplotlib and h5py are imported inside :func:`plot_runs`, so importing this module (and starting
the CLI) stays fast; the figure is drawn on an Agg canvas without pyplot, so no display, global
backend or figure registry is involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcfed.config import UserError

_METRICS = ("round", "test_accuracy", "bytes_up", "bytes_down", "sim_time")


@dataclass
class _Run:
    label: str
    algorithm: str
    metrics: dict[str, np.ndarray]  # _METRICS, truncated to a common length
    family_macs: np.ndarray | None = None  # SuperFed: MACs per subnet
    family_accuracy: np.ndarray | None = None  # last evaluation with any finite accuracy


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_run(run_dir: Path) -> _Run:
    import h5py

    path = run_dir if run_dir.suffix == ".h5" and run_dir.is_file() else run_dir / "log.h5"
    label = (path.parent if path.name == "log.h5" else path.with_suffix("")).resolve().name
    if not path.is_file():
        raise UserError(f"{path}: no such log file (is {run_dir} a run folder?)")
    try:
        with h5py.File(path, "r", locking=False) as f:
            if "metrics" not in f:
                raise UserError(f"{path}: not an hpcfed log (no 'metrics' group)")
            group = f["metrics"]
            missing = [k for k in _METRICS if k not in group]
            if missing:
                raise UserError(f"{path}: metrics/ lacks dataset(s) {', '.join(missing)}")
            raw = {k: np.asarray(group[k][()]).ravel() for k in _METRICS}
            # a live run appends dataset by dataset: keep the rows every dataset has
            n = min(len(v) for v in raw.values())
            metrics = {k: v[:n] for k, v in raw.items()}
            run = _Run(label, _text(f.attrs.get("algorithm", "")), metrics)
            if "family" in f and "accuracy" in f["family"]:
                family = f["family"]
                accuracy = np.atleast_2d(np.asarray(family["accuracy"][()], dtype=np.float64))
                macs = np.asarray(family.attrs.get("macs", []), dtype=np.float64).ravel()
                if "subnets" in family.attrs:  # a JSON list, one spec per column
                    n_subnets = len(json.loads(_text(family.attrs["subnets"])))
                    if n_subnets != len(macs):
                        raise UserError(f"{path}: family/ has {n_subnets} subnets but {len(macs)} MACs")
                if accuracy.size and accuracy.shape[1] != macs.size:
                    raise UserError(
                        f"{path}: family/accuracy has {accuracy.shape[1]} columns but {macs.size} MACs"
                    )
                evaluated = [r for r in accuracy if np.isfinite(r).any()]
                if evaluated:
                    run.family_macs, run.family_accuracy = macs, evaluated[-1]
            return run
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:  # not HDF5, truncated, wrong dtypes
        raise UserError(f"{path}: cannot read log ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


def plot_runs(run_dirs: list[Path], out_png: Path) -> Path:
    """Draw the runs in ``run_dirs`` (folders holding ``log.h5``) into ``out_png``; returns it."""
    if not run_dirs:
        raise UserError("plot: no run folders given")
    runs = [_read_run(Path(d)) for d in run_dirs]
    labels = [r.label for r in runs]
    for run, d in zip(runs, run_dirs):
        if labels.count(run.label) > 1:  # same run name under different out folders
            path = Path(d).resolve()
            run.label = f"{(path.parent if path.name == 'log.h5' else path).parent.name}/{run.label}"

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    panels = ["round", "bytes"]
    if any(r.algorithm.lower() == "hadfl" for r in runs):
        panels.append("sim_time")
    if any(r.family_accuracy is not None for r in runs):
        panels.append("family")

    fig = Figure(figsize=(4.8 * len(panels), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0]))
    for i, run in enumerate(runs):
        style = {"label": run.label, "color": f"C{i % 10}"}  # one colour per run in every panel
        m = run.metrics
        acc = m["test_accuracy"].astype(np.float64)
        cum_bytes = np.cumsum(m["bytes_up"].astype(np.float64) + m["bytes_down"].astype(np.float64))
        ok = np.isfinite(acc)
        axes["round"].plot(m["round"][ok], acc[ok], marker=".", **style)
        on_log = ok & (cum_bytes > 0)  # a log axis cannot show zero bytes
        axes["bytes"].plot(cum_bytes[on_log], acc[on_log], marker=".", **style)
        if "sim_time" in axes:
            t = m["sim_time"].astype(np.float64)
            axes["sim_time"].plot(t[ok], acc[ok], marker=".", **style)
        if "family" in axes and run.family_accuracy is not None:
            keep = np.isfinite(run.family_accuracy) & (run.family_macs > 0)
            order = np.argsort(run.family_macs[keep])
            axes["family"].plot(
                run.family_macs[keep][order], run.family_accuracy[keep][order], marker="o", **style
            )

    titles = {
        "round": ("round", "accuracy against round"),
        "bytes": ("cumulative bytes sent (up + down)", "accuracy against communication"),
        "sim_time": ("simulated time (s)", "accuracy against simulated time"),
        "family": ("MACs per inference", "subnets at the last evaluation"),
    }
    for key, ax in axes.items():
        xlabel, title = titles[key]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if key in ("bytes", "family"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short spans
        if ax.lines:
            ax.legend(fontsize="small")

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png
