"""[faults] and [robust] on several ranks: ``mpirun -n 2`` / ``-n 3 python -m pytest --with-mpi -m mpi``.

Fates come from (seed, round, client) and the median/trimmed mean gathers the cohort's deltas in
client order, so 1 rank (COMM_SELF, on rank 0) and N ranks must give the same model and counts.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.config import load_job
from hpcfed.io.metrics import read_metrics

from .conftest import QUICKSTART, shared_tmp, world_vs_single

pytestmark = pytest.mark.mpi

FAULTS = ["faults.nan_prob=0.2", "faults.drop_prob=0.2", "faults.slow_prob=0.3"]


@pytest.mark.parametrize(
    "overrides",
    [
        FAULTS,
        [*FAULTS, "robust.aggregate=median"],
        ["robust.aggregate=trimmed_mean", "robust.trim=0.25", "robust.clip_norm=1.0", "placement=fixed"],
    ],
    ids=["faults", "faults-median", "trimmed-clipped"],
)
def test_one_and_n_ranks_agree(overrides):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-faults-")
    job = load_job(
        QUICKSTART,
        [f"out={tmp}", "rounds=4", "eval_every=2", "data.num_clients=12", "clients_per_round=5", *overrides],
    )
    replicated, diff, acc = world_vs_single(job, comm, tmp)
    same_counts = None
    if comm.Get_rank() == 0:
        a = read_metrics(tmp / "world" / job.name / "log.h5")[1]
        b = read_metrics(tmp / "self" / job.name / "log.h5")[1]
        names = [n for n in ("rejected_updates", "dropped_clients", "slow_clients") if n in a]
        same_counts = all(np.array_equal(a[n], b[n]) for n in names) and a.keys() == b.keys()
    same_counts = comm.bcast(same_counts, root=0)
    assert replicated
    assert same_counts
    assert diff <= 1e-4, diff
    assert acc <= 1e-9, acc
