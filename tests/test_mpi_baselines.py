"""The baselines on several ranks: ``mpirun -n 2`` / ``-n 3 python -m pytest --with-mpi -m mpi``.

Each job runs on COMM_WORLD and, on rank 0, on COMM_SELF: the same model (bit-identical here,
as FedAvg is), SCAFFOLD's per-client control variates living on their home ranks.
"""

from __future__ import annotations

import pytest

from hpcfed.config import load_job

from .conftest import QUICKSTART, shared_tmp, world_vs_single

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=fedprox", "fedprox.mu=0.5", "faults.slow_prob=0.5"],
        ["algorithm=scaffold"],
        ["algorithm=scaffold", "scaffold.state=disk", "scaffold.control_update=I"],
        ["algorithm=fednova", "train.momentum=0.5", "faults.slow_prob=0.5"],
        ["fedavg.server_optimizer=adagrad", "fedavg.server_lr=0.05"],
        ["fedavg.server_optimizer=yogi", "fedavg.server_lr=0.05"],
    ],
    ids=["fedprox", "scaffold", "scaffold-disk-I", "fednova", "fedadagrad", "fedyogi"],
)
def test_baseline_same_model_on_one_and_many_ranks(overrides):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-baselines-")
    keys = [f"out={tmp}", "rounds=4", "eval_every=2", "data.num_clients=12", "clients_per_round=5"]
    job = load_job(QUICKSTART, [*keys, *overrides])
    replicated, diff, acc = world_vs_single(job, comm, tmp)
    assert replicated
    assert diff == 0.0, diff
    assert acc == 0.0, acc
