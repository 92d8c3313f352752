"""PriSM under MPI: ``mpirun -n 2`` and ``-n 3 python -m pytest --with-mpi -m mpi tests/test_mpi_prism.py``.

As in test_mpi.py, each test runs the job on COMM_WORLD and, on rank 0, the same job on COMM_SELF:
1 rank against 2 (or 3). The SVD runs on every rank; its input (the replicated model) must hold
the same bits everywhere, and kernel sampling comes from (seed, round, client) alone.
"""

from __future__ import annotations

import pytest

from hpcfed.config import load_job

from .conftest import QUICKSTART, shared_tmp, world_vs_single

pytestmark = pytest.mark.mpi

PRISM = ["algorithm=prism", "model.name=cnn", "prism.keep=0.25", "prism.layers=all"]


@pytest.mark.parametrize(
    "overrides",
    [
        PRISM,
        [
            *PRISM,
            "prism.keep=[0.25, 0.5]",
            "prism.out_keep=0.5",
            "prism.sampling=uniform",
            "train.momentum=0.5",
        ],
        [*PRISM, "prism.sampling=channels"],
    ],
    ids=["principal", "heterogeneous", "channels"],
)
def test_one_two_three_ranks_same_model(overrides):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-prism-")
    job = load_job(
        QUICKSTART,
        [f"out={tmp}", "rounds=3", "eval_every=3", "data.num_clients=12", "clients_per_round=5", *overrides],
    )
    replicated, diff, acc = world_vs_single(job, comm, tmp)
    assert replicated
    assert diff <= 1e-4, diff
    assert acc <= 1e-9, acc
