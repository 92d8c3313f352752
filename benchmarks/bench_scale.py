"""Scale: FedAvg on LEAF Synthetic with 10,000 and 100,000 clients, 100 per round, on 2 ranks.

Each configuration is a whole ``mpirun -n RANKS python -m hpcfed run`` from launch to exit, with
the peak summed resident memory of mpirun and its ranks (benchmarks/_proc.py). A federated run
should cost what its cohort costs: nothing may grow with the number of clients but the partition
(client sizes and index arrays) and per-client state. The Synthetic generator makes a user only
when it is trained, so this isolates the engine. Targets (issue 10): 10,000 clients < 120 s and
< 4 GiB across all processes.

ResFed's per-client state (trajectories at both ends of each link: about nine models per client
that has ever taken part) is the one thing that must grow with the clients; ``--resfed`` runs it
with 1,000 clients, 100 a round, with the state in memory and in the per-rank HDF5 store
(``resfed.state = "disk"``), checkpointing at the end (every rank streams its clients' state to
rank 0 one array at a time).

    python benchmarks/bench_scale.py [--ranks 2] [--resfed] [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from _proc import run_tree

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "fedavg_synthetic.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--resfed", action="store_true", help="also ResFed, memory vs disk state")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PRTE_MCA_rmaps_default_mapping_policy"] = ":oversubscribe"
    mpirun = Path(sys.executable).parent / "mpirun"
    rows = []
    configs = [(n, []) for n in args.clients]
    if args.resfed:
        resfed = ["algorithm=resfed", "resfed.predictor=received", f"rounds={2 * args.rounds}"]
        configs += [
            (n, [*resfed, f"resfed.state={state}"]) for n in (100, 1_000) for state in ("memory", "disk")
        ]
    for n, extra in configs:
        out = tempfile.mkdtemp(prefix="hpcfed-bench-scale-")
        cmd = [
            str(mpirun if mpirun.exists() else "mpirun"),
            "-n",
            str(args.ranks),
            sys.executable,
            "-m",
            "hpcfed",
            "run",
            str(JOB),
            f"out={out}",
            f"data.num_clients={n}",
            f"clients_per_round={args.per_round}",
            f"rounds={args.rounds}",
            f"eval_every={args.rounds}",
            f"checkpoint_every={args.rounds}",
            *extra,
        ]
        wall, peak, proc = run_tree(cmd, env)
        if proc.returncode:
            sys.exit(f"{n} clients failed: {proc.stderr[-2000:]}")
        label = " ".join(extra) or "fedavg"
        rows.append(
            {"clients": n, "job": label, "wall_s": wall, "peak_bytes": peak, "peak_gib": peak / 2**30}
        )
        print(
            f"{n:>8,} clients {label}: {wall:7.1f} s, peak {peak / 2**30:.2f} GiB (all processes)", flush=True
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "ranks": args.ranks,
        "per_round": args.per_round,
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
