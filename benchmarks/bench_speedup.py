"""Parallel speedup of a compute-bound job: 1 rank against N ranks, the same model.

Digits with the small CNN, 5 local epochs, 20 clients per round (issue 10's job). Each rank count
is a whole ``mpirun -n R python -m hpcfed run``; the figure is the loop's own clock (the log's
``wall_time`` at the last round: rounds, evaluation and checkpoints, without process start-up),
and the final models of the runs are compared. Clients are placed on ranks by LPT on their
sample counts (``placement = "balanced"``): for one model and one epoch count a client's cost is
proportional to its samples, so that is the measured cost of a client up to a constant.

    python benchmarks/bench_speedup.py [--ranks 1 2] [--rounds 20] [--out benchmarks/results/speedup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "quickstart.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speedup.json")
    args = ap.parse_args()

    from hpcfed.io.checkpoint import load_latest
    from hpcfed.io.metrics import read_metrics

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = Path(sys.executable).parent / "mpirun"
    rows, models = [], {}
    for repeat in range(args.repeats):
        for ranks in args.ranks:
            out = Path(tempfile.mkdtemp(prefix="hpcfed-bench-speedup-"))
            overrides = [
                f"out={out}",
                "name=cnn",
                "model.name=cnn",
                "train.epochs=5",
                "clients_per_round=20",
                f"rounds={args.rounds}",
                f"eval_every={args.rounds}",
                f"checkpoint_every={args.rounds}",
            ]
            cmd = [
                str(mpirun if mpirun.exists() else "mpirun"),
                "-n",
                str(ranks),
                sys.executable,
                "-m",
                "hpcfed",
            ]
            proc = subprocess.run(
                [*cmd, "run", str(JOB), *overrides], env=env, capture_output=True, text=True
            )
            if proc.returncode:
                sys.exit(f"{ranks} ranks failed: {proc.stderr[-2000:]}")
            cols = read_metrics(out / "cnn" / "log.h5")[1]
            ckpt = load_latest(out / "cnn")
            models[ranks] = np.concatenate([np.ravel(v) for v in ckpt.model.values()])
            rows.append({"ranks": ranks, "repeat": repeat, "loop_s": float(cols["wall_time"][-1])})
            print(f"{ranks} rank(s): {rows[-1]['loop_s']:.2f} s for {args.rounds} rounds", flush=True)
    best = {r: min(row["loop_s"] for row in rows if row["ranks"] == r) for r in args.ranks}
    base = args.ranks[0]
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "job": "digits CNN, 5 local epochs, 20 clients per round, 100 clients",
        "rounds": args.rounds,
        "runs": rows,
        "best_loop_s": best,
        "speedup": {r: best[base] / best[r] for r in args.ranks},
        "max_model_difference": {r: float(np.abs(models[r] - models[base]).max()) for r in args.ranks},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("best_loop_s", "speedup", "max_model_difference")}))


if __name__ == "__main__":
    main()
