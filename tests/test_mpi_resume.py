"""Every algorithm resumes exactly on several ranks: 3 rounds, then resume to 6, equals 6 straight.

Run with ``mpirun -n 2`` (and ``-n 3``) ``python -m pytest --with-mpi -m mpi tests/test_mpi_resume.py``.
The serial suite checks the same on one rank (test_runner, test_dp, test_prism, test_resfed); here
the per-client state is spread over ranks and gathered into the checkpoint, and the resumed ranks
each take back their clients' share. ResFed's trajectories: test_mpi_resfed.py. Every rank
compares its own replicated server state and the log rank 0 wrote, so all ranks assert the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.config import load_job

from .conftest import QUICKSTART, assert_resume_matches, run_in_process, shared_tmp

pytestmark = pytest.mark.mpi

BASE = ["data.num_clients=12", "clients_per_round=5", "eval_every=2", "checkpoint_every=100"]
COLUMNS = ("train_loss", "bytes_up", "bytes_down", "rejected_updates")
FEDPT = ["algorithm=fedpt", 'fedpt.freeze="largest"']
DP = ["dp.clip=0.5", "dp.noise_multiplier=1.0"]
PRISM = ["algorithm=prism", "model.name=cnn", "prism.keep=[0.25, 0.5]", "prism.layers=all"]
EF = ["compress.sparsity=0.9", "compress.quantization=uniform", "compress.bits=4"]
FAULTS = ["faults.nan_prob=0.2", "faults.drop_prob=0.2", "faults.slow_prob=0.3"]

CASES = {
    "fedavg-dp": ([*DP, "fedavg.server_momentum=0.5"], ("epsilon", "clipped_updates")),
    "fedpt": ([*FEDPT, "fedavg.server_optimizer=adam", "fedavg.server_lr=0.01"], ()),
    "fedpt-dp": ([*FEDPT, *DP], ("epsilon",)),
    "prism": ([*PRISM, "prism.keep_probs=[0.5, 0.5]", "train.momentum=0.5"], ("sub_params",)),
    # per-client residuals live on home ranks: gathered into the checkpoint, handed back on resume
    "fedavg-error-feedback": ([*EF, "compress.error_feedback=true", "compress.direction=both"], ()),
    "fedavg-faults-robust": (
        [*FAULTS, "robust.aggregate=trimmed_mean", "robust.trim=0.2", "robust.clip_norm=2.0"],
        ("dropped_clients", "slow_clients"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_n_ranks_equals_uninterrupted(case):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    overrides, extra_columns = CASES[case]
    tmp = shared_tmp(comm, f"hpcfed-mpi-resume-{case}-")

    def job(name, rounds):
        return load_job(QUICKSTART, [f"out={tmp}", f"name={name}", f"rounds={rounds}", *BASE, *overrides])

    straight = run_in_process(job("straight", 6), comm=comm)
    run_in_process(job("parts", 3), comm=comm)
    comm.Barrier()  # rank 0 wrote the checkpoint; the others must not look for it before
    resumed = run_in_process(job("parts", 6), resume=True, comm=comm)
    comm.Barrier()  # and both logs, before every rank reads them
    worst = max(float(np.abs(straight.state[k] - resumed.state[k]).max(initial=0.0)) for k in straight.state)
    verdicts = comm.allgather(worst)
    if comm.Get_rank() == 0:  # visible with -s
        print(f"{case} on {comm.Get_size()} ranks: max |straight - resumed| = {max(verdicts):.3g}")
    assert max(verdicts) <= 1e-6
    a, _ = assert_resume_matches(straight, resumed, tmp, (*COLUMNS, *extra_columns))
    if "epsilon" in extra_columns:  # the accountant continues from the checkpointed round count
        assert np.isfinite(a["epsilon"]).all() and (np.diff(a["epsilon"]) > 0).all()
    if case == "fedavg-faults-robust":
        assert a["dropped_clients"].sum() > 0 and a["rejected_updates"].sum() > 0
