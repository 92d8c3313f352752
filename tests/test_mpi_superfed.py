"""SuperFed under MPI: ``mpirun -n 2`` and ``-n 3 python -m pytest --with-mpi -m mpi
tests/test_mpi_superfed.py``.

As in test_mpi_prism.py, the job runs on COMM_WORLD and, on rank 0, on COMM_SELF: 1 rank against
2 (or 3). Subnet assignment (tracking sandwich + random subnets) must come from the replicated
counters and (seed, round, client) alone, whatever rank trains a client. Then a run interrupted
after 3 rounds and resumed to 6 equals 6 rounds straight, family/ rows included.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.config import load_job
from hpcfed.signals import StopFlag

from .conftest import QUICKSTART, assert_resume_matches, run_in_process, shared_tmp, world_vs_single

pytestmark = pytest.mark.mpi

SUPERFED = [
    "algorithm=superfed",
    "model.name=elastic_mlp",
    "model.hidden=[32, 32]",
    "superfed.depths=[1, 2]",
    "superfed.widths=[0.25, 0.5, 1.0]",
    "data.num_clients=12",
    "clients_per_round=5",
]


# the options beyond the paper's reading: sample weights, the cohort average, both teachers
OPTIONS = {
    "paper": ["superfed.beta0=0.9", "superfed.weighting=maxnet"],
    "options": ["superfed.weighting=samples", "superfed.average=cohort", "superfed.distill=0.3"],
    "subnet-teacher": ["superfed.distill=0.3", "superfed.teacher=subnet"],
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_one_two_three_ranks_same_supernet(options):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-superfed-")
    job = load_job(QUICKSTART, [f"out={tmp}", "rounds=4", "eval_every=2", *SUPERFED, *OPTIONS[options]])
    replicated, diff, acc = world_vs_single(job, comm, tmp)
    assert replicated
    assert diff <= 1e-6, diff
    assert acc <= 1e-9, acc


class StopAfter(StopFlag):
    """A stop request that arrives during round ``n`` (as a SIGTERM would, on every rank)."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def __bool__(self) -> bool:  # the loop asks once per round
        self.left -= 1
        if self.left <= 0:
            self.received = "test"
        return self.received is not None


@pytest.mark.parametrize("options", ["paper", "options"])
def test_resume_on_n_ranks_equals_uninterrupted(options):
    from mpi4py import MPI

    from hpcfed.io.metrics import read_metrics
    from hpcfed.runner import Run

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-superfed-resume-")
    overrides = [
        f"out={tmp}",
        "rounds=6",
        "eval_every=1",
        "checkpoint_every=10",
        *SUPERFED,
        *OPTIONS[options],
    ]
    job = load_job(QUICKSTART, overrides)
    straight = run_in_process(job.model_copy(update={"name": "straight"}), comm=comm)
    parts = job.model_copy(update={"name": "parts"})
    first = Run(parts, comm, parts.run_dir, progress=False, stop=StopAfter(3))
    first.create_files()
    assert first.loop().rounds_done == 3
    comm.Barrier()  # rank 0 writes the checkpoint; the others must not look for it before
    resumed = run_in_process(parts, resume=True, comm=comm)
    diff = float(np.abs(resumed.state["model"] - straight.state["model"]).max())
    assert diff <= 1e-6, diff
    comm.Barrier()  # the logs are complete on disk before any rank reads them
    assert_resume_matches(straight, resumed, tmp, ("bytes_up", "bytes_down", "train_macs", "test_accuracy"))
    import h5py

    families = []
    for name in ("straight", "parts"):
        with h5py.File(tmp / name / "log.h5", "r", locking=False) as f:
            families.append({k: f["family"][k][()] for k in f["family"]})
    assert families[1]["round"].tolist() == list(range(6))
    for key in families[0]:
        np.testing.assert_array_equal(families[0][key], families[1][key])
    assert read_metrics(tmp / "parts" / "log.h5")[1]["round"].tolist() == list(range(6))
