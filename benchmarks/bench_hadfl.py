"""HADFL against its baselines on one simulated clock (docs/hadfl.md, issue 7).

jobs/hadfl_digits.toml: digits, 8 devices with speeds 1,1,1,1,2,2,4,8, MLP, SGD lr 0.05 batch 10.
Each schedule runs for the same simulated-time budget (rounds = budget / its cycle length) and is
evaluated after every cycle; we report the simulated time at which the averaged device model
first reaches the target accuracy (85 %), the final accuracy and the peer-to-peer bytes.

- ``hadfl``: τ_max = 16 for the fastest device (2 s cycles), half the devices pair up per cycle;
- ``dfedavg``: the same τ = 16 for everyone, then a full average (16 s cycles);
- ``sync``: data-parallel SGD at the slowest pace; its cycle is set to ONE step (1 s) so that it
  is evaluated after every step (local_steps only sets sync's cycle length, not its maths).

The shared settings (lr, batch, τ) are the job's for all three. Rows for an IID split (the
paper's data-parallel setting) and a Dirichlet(0.5) label skew, over three seeds.

    mpirun -n 2 python benchmarks/bench_hadfl.py [--budget 320] [--seeds 0 1 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from hpcfed.algorithms.hadfl import cycle_time, resolve_speeds  # noqa: E402
from hpcfed.comm import world  # noqa: E402
from hpcfed.config import load_job  # noqa: E402
from hpcfed.io.metrics import read_metrics  # noqa: E402
from hpcfed.runner import Run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "hadfl_digits.toml"
TARGET = 0.85
PARTITIONS = {"iid": ["data.partition=iid"], "dirichlet0.5": ["data.partition=dirichlet", "data.alpha=0.5"]}


def one_run(comm, out: Path, schedule: str, partition: str, seed: int, budget: float) -> dict | None:
    extra = ["hadfl.local_steps=1"] if schedule == "sync" else []
    name = f"{schedule}-{partition}-s{seed}"
    overrides = [f"out={out}", f"name={name}", f"seed={seed}", f"hadfl.schedule={schedule}", "eval_every=1"]
    job = load_job(JOB, [*overrides, *PARTITIONS[partition], *extra])
    speeds = resolve_speeds(job.hadfl.speeds, job.data.num_clients, seed)
    cycle = cycle_time(schedule, speeds, job.hadfl.local_steps)
    job = job.model_copy(update={"rounds": math.ceil(budget / cycle), "checkpoint_every": 10**6})
    t0 = time.perf_counter()
    run = Run(job, comm, job.run_dir, progress=False)
    run.create_files()
    run.loop()
    wall = time.perf_counter() - t0
    if comm.Get_rank() != 0:
        return None
    m = read_metrics(job.run_dir / "log.h5")[1]
    acc, t = m["test_accuracy"], m["sim_time"]
    hit = np.flatnonzero(acc >= TARGET)
    return {
        "schedule": schedule,
        "partition": partition,
        "seed": seed,
        "cycles": job.rounds,
        "cycle_time": cycle,
        "time_to_target": float(t[hit[0]]) if hit.size else None,
        # the evaluation before: the true crossing lies in (previous, time_to_target]
        "previous_evaluation": float(t[hit[0] - 1]) if hit.size and hit[0] > 0 else 0.0,
        "final_accuracy": float(acc[-1]),
        "bytes_p2p": int(m["bytes_up"].sum()),
        "wall_seconds": round(wall, 2),
    }


def _ratio(base: dict, hadfl: dict) -> float | None:
    """How many times less simulated time HADFL needed to reach the target (None: one never did)."""
    if hadfl["time_to_target"] is None or base["time_to_target"] is None:
        return None
    return round(base["time_to_target"] / hadfl["time_to_target"], 2)


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for partition in PARTITIONS:
        for seed in sorted({r["seed"] for r in rows}):
            by = {r["schedule"]: r for r in rows if r["partition"] == partition and r["seed"] == seed}
            h, d, s = by["hadfl"], by["dfedavg"], by["sync"]
            out.append(
                {
                    "partition": partition,
                    "seed": seed,
                    "speedup_vs_dfedavg": _ratio(d, h),
                    "speedup_vs_sync": _ratio(s, h),
                    "final_accuracy_hadfl_minus_dfedavg": round(h["final_accuracy"] - d["final_accuracy"], 4),
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=320.0, help="simulated seconds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hadfl.json"))
    args = p.parse_args()
    comm = world()
    tmp = Path(comm.bcast(tempfile.mkdtemp(prefix="hpcfed-bench-hadfl-") if comm.Get_rank() == 0 else None))
    rows = []
    for partition in PARTITIONS:
        for seed in args.seeds:
            for schedule in ("hadfl", "dfedavg", "sync"):
                row = one_run(comm, tmp, schedule, partition, seed, args.budget)
                if row is not None:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if comm.Get_rank() == 0:
        result = {
            "job": str(JOB.relative_to(ROOT)),
            "ranks": comm.Get_size(),
            "target_accuracy": TARGET,
            "budget_sim_seconds": args.budget,
            "runs": rows,
            "summary": summarise(rows),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        for s in result["summary"]:
            print(s)
        print(args.out)


if __name__ == "__main__":
    main()
