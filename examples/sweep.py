"""A small sweep from Python, reading the results back from each run's log.h5.

    python examples/sweep.py                 # one process
    mpirun -n 2 python examples/sweep.py     # every rank runs this script; each job uses both

Every rank calls hpcfed.run (as every rank runs the hpcfed command); rank 0 writes the files
and prints. Each run gives the same model whatever the number of ranks.
"""

import argparse
import tempfile
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

import hpcfed

JOB = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.toml"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    out = args.out or comm.bcast(tempfile.mkdtemp(prefix="hpcfed-sweep-") if comm.rank == 0 else None)

    rows = []
    for lr in (0.02, 0.05, 0.1):
        result = hpcfed.run(
            JOB,
            overrides=[
                f"out={out}",
                f"name=lr{lr}",
                f"rounds={args.rounds}",
                f"train.lr={lr}",
                "eval_every=5",
            ],
            progress=False,
        )
        with h5py.File(result.log_path, "r") as log:  # readable while a run is alive, too
            acc = log["metrics/test_accuracy"][()]
            sent = log["metrics/bytes_up"][()].sum()
        best = np.nanmax(acc)
        rows.append((lr, result.test_accuracy, best, sent))

    if comm.rank == 0:
        print(f"{'train.lr':>8}  {'final acc':>9}  {'best acc':>8}  {'MB up':>6}")
        for lr, final, best, sent in rows:
            print(f"{lr:>8}  {final:>9.4f}  {best:>8.4f}  {sent / 1e6:>6.2f}")


if __name__ == "__main__":
    main()
