"""User code on several ranks (#15): ``mpirun -n 2`` / ``-n 3 python -m pytest --with-mpi -m mpi``.

A user package (model, dataset, loss, strategy; tests/userpkg.py) in a folder every rank sees:
the job gives the same model on COMM_WORLD as on one rank (COMM_SELF, on rank 0), resumes exactly
through the Python API, and every rank calls ``hpcfed.run`` as in a user's script.
"""

from __future__ import annotations

import numpy as np
import pytest

import hpcfed
from hpcfed.config import load_job

from .conftest import shared_tmp, world_vs_single
from .userpkg import write_job, write_package

pytestmark = pytest.mark.mpi


def _lab(comm, name: str):
    tmp = shared_tmp(comm, "hpcfed-mpi-api-")
    if comm.Get_rank() == 0:
        write_package(tmp)
    comm.Barrier()
    return tmp


@pytest.mark.parametrize(
    "keys",
    [
        dict(algorithm="mylab.algos:Scaled"),
        dict(dataset="mylab.data:lazy", algorithm="mylab.algos:FromScratch"),
        dict(dataset="mylab.data:pooled", partition="dirichlet", loss="cross_entropy"),
    ],
    ids=["scaled", "lazy-from-scratch", "pooled-builtin-loss"],
)
def test_user_code_same_model_on_one_and_many_ranks(keys):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = _lab(comm, "same")
    job_file = write_job(tmp, file=f"job-{comm.Get_rank()}.toml", **keys)
    scaled = "Scaled" in keys.get("algorithm", "")
    job = load_job(job_file, [f"out={tmp}", *(["strategy.scale=0.5"] if scaled else [])])
    replicated, diff, acc = world_vs_single(job, comm, tmp)
    assert replicated
    assert diff <= 1e-6, diff
    assert acc <= 1e-6, acc


def test_api_run_and_resume_on_many_ranks():
    """Every rank calls hpcfed.run / hpcfed.resume, as a script under mpirun does."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = _lab(comm, "api")
    job_file = write_job(tmp, file=f"job-{comm.Get_rank()}.toml", algorithm="mylab.algos:Scaled")
    straight = hpcfed.run(job_file, [f"out={tmp}", "name=straight"], progress=False)
    part = hpcfed.run(job_file, [f"out={tmp}", "name=parts", "rounds=3"], progress=False)
    resumed = hpcfed.resume(part.run_dir, ["rounds=6"], progress=False)
    assert (straight.rounds_done, part.rounds_done, resumed.rounds_done) == (6, 3, 6)
    a = hpcfed.load_state_dict(straight.checkpoint)
    b = hpcfed.load_state_dict(resumed.checkpoint)
    same = all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert comm.allreduce(int(same)) == comm.Get_size()
