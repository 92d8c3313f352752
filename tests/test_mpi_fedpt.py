"""MPI suite for FedPT and DP: run under ``mpirun -n 2`` and ``-n 3`` with ``pytest --with-mpi -m mpi``.

As in test_mpi.py, each test runs the job on COMM_WORLD and, on rank 0, the same job on COMM_SELF,
and every rank asserts the same facts (one failing rank must not leave the others in a collective).
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.algorithms.dp import DifferentialPrivacy
from hpcfed.config import DPConfig, load_job
from hpcfed.runner import Run

from .conftest import QUICKSTART, shared_tmp

pytestmark = pytest.mark.mpi

BASE = ["rounds=3", "eval_every=3", "data.num_clients=12", "clients_per_round=5"]


def _run(job, comm, run_dir):
    run = Run(job, comm, run_dir, progress=False)
    initial = run.state["model"].copy()
    run.create_files()
    result = run.loop()
    return run, result, initial


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=fedpt", 'fedpt.freeze="largest"'],
        ["algorithm=fedpt", 'fedpt.freeze=["conv1.*", "fc1.*"]', "model.name=cnn", "clients_per_round=3"],
        ["algorithm=fedpt", 'fedpt.freeze="largest"', "dp.clip=0.5", "dp.noise_multiplier=0.7"],
        ["dp.clip=0.3", "dp.noise_multiplier=1.0"],  # DP-FedAvg
    ],
    ids=["fedpt", "fedpt-cnn", "dp-fedpt", "dp-fedavg"],
)
def test_one_vs_n_ranks_frozen_identical(overrides):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-fedpt-")
    job = load_job(QUICKSTART, [f"out={tmp}", *BASE, *overrides])
    run, result, initial = _run(job, comm, tmp / "world")
    models = comm.allgather(run.state["model"])
    replicated = all(np.array_equal(m, models[0]) for m in models)
    initials = comm.allgather(initial)
    same_seed_model = all(np.array_equal(m, initials[0]) for m in initials)
    frozen_ok = True
    if job.algorithm == "fedpt":
        frozen = np.ones(run.flat.size, dtype=bool)
        frozen[run.strategy.index] = False
        # unchanged after training, in the server state and in the module every client trained
        frozen_ok = np.array_equal(run.state["model"][frozen], initial[frozen])
        frozen_ok &= np.array_equal(run.flat.get()[frozen], initial[frozen])
        frozen_ok &= bool(frozen.any())
    frozen_ok = comm.allgather(frozen_ok)
    diff, acc = None, None
    if comm.Get_rank() == 0:
        single, single_result, _ = _run(job, MPI.COMM_SELF, tmp / "self")
        diff = float(np.abs(single.state["model"] - run.state["model"]).max())
        acc = abs(single_result.test_accuracy - result.test_accuracy)
    diff, acc = comm.bcast((diff, acc), root=0)
    assert replicated
    assert same_seed_model  # frozen weights come from the seed: bit-identical on every rank
    assert all(frozen_ok)
    assert diff <= 1e-4, diff
    assert acc <= 1e-9, acc


@pytest.mark.parametrize("secure", [False, True])
def test_noise_identical_on_every_rank(secure):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    cfg = DPConfig(clip=0.5, noise_multiplier=1.2, delta=1e-5, secure_noise=secure)
    dp = DifferentialPrivacy(cfg, seed=3, comm=comm, num_clients=20, clients_per_round=5)
    draws = [dp.noise(1000, r) for r in (0, 1)]
    gathered = comm.allgather(draws)
    same = all(np.array_equal(g[i], draws[i]) for g in gathered for i in (0, 1))
    fresh = not np.array_equal(draws[0], draws[1])
    assert same and fresh


def test_secure_noise_run_stays_replicated():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-fedpt-")
    overrides = ["algorithm=fedpt", 'fedpt.freeze="largest"', "dp.clip=0.5", "dp.secure_noise=true"]
    job = load_job(QUICKSTART, [f"out={tmp}", *BASE, *overrides])
    run, _, _ = _run(job, comm, tmp / "secure")
    models = comm.allgather(run.state["model"])
    assert all(np.array_equal(m, models[0]) for m in models)
