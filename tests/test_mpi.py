"""MPI suite: run under ``mpirun -n 2`` and ``-n 3`` with ``pytest --with-mpi -m mpi``.

Each test runs the job on COMM_WORLD and, on rank 0, the same job on COMM_SELF: so every MPI
session checks 1 rank against 2 (or 3) ranks in the same process.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from hpcfed.config import load_job
from hpcfed.runner import Run

from .conftest import QUICKSTART, shared_tmp, world_vs_single

pytestmark = pytest.mark.mpi


def _run(job, comm, run_dir, stop_on_rank=None):
    run = Run(job, comm, run_dir, progress=False)
    run.create_files()
    if stop_on_rank == comm.Get_rank():
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, reaching this rank only
    result = run.loop()
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    return run, result


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["fedavg.server_optimizer=adam", "fedavg.server_lr=0.01", "train.momentum=0.5", "placement=fixed"],
        ["data.dataset=synthetic", "data.partition=natural", "model.name=mlp"],
        ["model.name=cnn", "data.partition=iid", "clients_per_round=3"],
        [
            "compress.sparsity=0.9",
            "compress.quantization=uniform",
            "compress.bits=4",
            "compress.rounding=stochastic",
            "compress.error_feedback=true",
            "compress.direction=both",
        ],
    ],
)
def test_one_two_three_ranks_same_model(overrides):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-")
    job = load_job(
        QUICKSTART,
        [f"out={tmp}", "rounds=4", "eval_every=2", "data.num_clients=12", "clients_per_round=5", *overrides],
    )
    replicated, diff, acc = world_vs_single(job, comm, tmp)
    assert replicated
    assert diff <= 1e-4, diff
    assert acc <= 1e-9, acc


def test_signal_on_one_rank_stops_all_at_the_same_boundary():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-")
    job = load_job(QUICKSTART, [f"out={tmp}", "rounds=20", "data.num_clients=12", "clients_per_round=4"])
    last = comm.Get_size() - 1
    run, result = _run(job, comm, tmp / "stop", stop_on_rank=last)
    rounds = comm.allgather(result.rounds_done)
    written = comm.bcast((tmp / "stop" / "checkpoints" / "round_000001.h5").exists(), root=0)
    assert rounds == [1] * comm.Get_size()  # everyone stopped after the first round
    assert result.stopped_by is not None
    assert written


@pytest.mark.mpi
def test_send_and_recv_arrays_stream_every_rank_to_rank_0():
    from mpi4py import MPI

    from hpcfed.comm import recv_arrays, send_arrays

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    def mine(r):  # several dtypes and shapes, including empty and 0-d
        return [
            (f"a.{r}", np.arange(6, dtype=np.float32).reshape(2, 3) + r),
            (f"b.{r}", np.array(r, np.int64)),
            (f"c.{r}", np.zeros((0, 4), np.float64)),
        ]

    if rank:
        send_arrays(comm, iter(mine(rank)), dest=0)
        ok = None
    else:
        got = [pair for r in range(1, size) for pair in recv_arrays(comm, source=r)]
        want = [pair for r in range(1, size) for pair in mine(r)]
        ok = [n for n, _ in got] == [n for n, _ in want] and all(
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            for (_, a), (_, b) in zip(got, want)
        )
    assert comm.bcast(ok, root=0)
