"""ResFed under MPI: run with ``mpirun -n 2`` / ``-n 3 python -m pytest --with-mpi -m mpi``.

The job runs on COMM_WORLD (each client's trajectories on rank client % N) and, on rank 0, on
COMM_SELF; every rank then asserts the same facts (agreed by a bcast), so a failing rank never
leaves the others waiting in a collective.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.config import load_job
from hpcfed.io.checkpoint import load_latest
from hpcfed.runner import Run

from .conftest import QUICKSTART, shared_tmp

pytestmark = pytest.mark.mpi

BASE = [
    "algorithm=resfed",
    "rounds=5",
    "eval_every=5",
    "data.num_clients=9",
    "clients_per_round=5",  # partial participation: trajectories go stale on some ranks
    "train.batch_size=60",
    "resfed.sparsity=0.9",
    "resfed.quantization=median",
    "resfed.bits=2",
]


def _run(job, comm, run_dir, resume=False):
    run = Run(job, comm, run_dir, progress=False)
    if resume:
        run.restore(load_latest(run_dir))
    else:
        run.create_files()
    result = run.loop()
    return run, result


def _trajectories(run) -> dict[str, np.ndarray]:
    return run.strategy.extra_state()


@pytest.mark.parametrize(
    "overrides",
    [
        ["resfed.predictor=linear"],
        ["resfed.predictor=last", "resfed.state=disk"],
        ["resfed.predictor=received", "resfed.state=disk"],  # with the uplink's error memory
        ["resfed.sparsity=0", "resfed.quantization=none"],  # lossless
    ],
)
def test_one_and_n_ranks_agree(overrides):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-resfed-")
    job = load_job(QUICKSTART, [f"out={tmp}", *BASE, *overrides])
    run, result = _run(job, comm, tmp / "world")
    models = comm.allgather(run.state["model"])
    replicated = all(np.array_equal(m, models[0]) for m in models)
    # the per-client trajectories, gathered from their home ranks
    parts = comm.gather(_trajectories(run), root=0)
    facts = None
    if comm.Get_rank() == 0:
        single, single_result = _run(job, MPI.COMM_SELF, tmp / "self")
        gathered = {k: v for part in parts for k, v in part.items()}
        alone = _trajectories(single)
        facts = (
            float(np.abs(single.state["model"] - run.state["model"]).max()),
            abs(single_result.test_accuracy - result.test_accuracy),
            sorted(gathered) == sorted(alone),
            max((float(np.abs(gathered[k] - alone[k]).max()) for k in alone), default=0.0),
        )
    diff, acc, same_keys, traj_diff = comm.bcast(facts, root=0)
    if comm.Get_rank() == 0:  # visible with -s
        where = f"resfed {overrides}: 1 vs {comm.Get_size()} ranks"
        print(f"{where}: model {diff:.3g}, trajectories {traj_diff:.3g}")
    assert replicated
    assert same_keys
    assert diff <= 1e-4, diff
    assert traj_diff <= 1e-4, traj_diff
    assert acc <= 1e-9, acc


def test_resume_on_n_ranks_equals_uninterrupted():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-resfed-")
    job6 = load_job(QUICKSTART, [f"out={tmp}", *BASE, "rounds=6", "checkpoint_every=3"])
    straight, _ = _run(job6, comm, tmp / "straight")
    job3 = load_job(QUICKSTART, [f"out={tmp}", *BASE, "rounds=3", "checkpoint_every=3"])
    _run(job3, comm, tmp / "parts")
    comm.Barrier()  # rank 0 writes the checkpoint; the others must not look for it before
    resumed, _ = _run(job6, comm, tmp / "parts", resume=True)
    same = np.array_equal(straight.state["model"], resumed.state["model"])
    mine_a, mine_b = _trajectories(straight), _trajectories(resumed)
    same_state = sorted(mine_a) == sorted(mine_b) and all(
        np.array_equal(mine_a[k], mine_b[k]) for k in mine_a
    )
    verdicts = comm.allgather((same, same_state))
    assert all(v[0] for v in verdicts)
    assert all(v[1] for v in verdicts)
