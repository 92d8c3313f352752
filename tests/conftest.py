"""Shared test helpers: small jobs, the CLI in a subprocess, mpirun command lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.toml"
VENV_BIN = Path(sys.executable).parent


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if os.geteuid() == 0:  # Open MPI refuses root without these
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PRTE_MCA_rmaps_default_mapping_policy"] = ":oversubscribe"
    return env


def hpcfed(*args: str, ranks: int = 0, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m hpcfed ARGS`` (under ``mpirun -n ranks`` when ranks > 0)."""
    cmd = [sys.executable, "-m", "hpcfed", *map(str, args)]
    if ranks:
        mpirun = VENV_BIN / "mpirun"
        cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(ranks), *cmd]
    kwargs.setdefault("cwd", ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), **kwargs)


def run_mpi(python_args: list, ranks: int, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """``mpirun -n ranks python ARGS`` in its own session; on timeout the whole process group
    (mpirun and every rank) is killed, so a hang fails the test and leaves nothing behind.
    Returns the finished process and the seconds it took."""
    import os
    import signal
    import time

    mpirun = VENV_BIN / "mpirun"
    cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(ranks)]
    cmd += [sys.executable, *map(str, python_args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpirun -n {ranks} still running after {timeout:.0f} s (hung):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - t0


@pytest.fixture
def small_overrides(tmp_path):
    """Overrides that shrink the quickstart job to a few seconds."""
    return [
        f"out={tmp_path}",
        "rounds=4",
        "eval_every=2",
        "checkpoint_every=2",
        "data.num_clients=20",
        "clients_per_round=5",
    ]


def run_in_process(job, resume: bool = False, comm=None):
    """Run a job in this process (COMM_WORLD unless given): fresh, or resumed from its newest
    checkpoint. Returns the finished :class:`hpcfed.runner.Run`."""
    from hpcfed.comm import world
    from hpcfed.io.checkpoint import load_latest
    from hpcfed.runner import Run

    run = Run(job, comm if comm is not None else world(), job.run_dir, progress=False)
    if resume:
        run.restore(load_latest(job.run_dir))
    else:
        run.create_files()
    run.result = run.loop()
    return run


def shared_tmp(comm, prefix: str = "hpcfed-mpi-") -> Path:
    """A temporary folder made by rank 0, its path known to every rank (MPI tests)."""
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix) if comm.Get_rank() == 0 else None
    return Path(comm.bcast(path, root=0))


def world_vs_single(job, comm, tmp: Path) -> tuple[bool, float, float]:
    """Run ``job`` on ``comm`` and, on rank 0, on COMM_SELF; return facts every rank agrees on:
    (the server model is the same on every rank, max |model difference|, |accuracy difference|).
    Every rank then asserts the same values, so a failure never leaves a rank in a collective."""
    import numpy as np
    from mpi4py import MPI

    world_run = run_in_process(job.model_copy(update={"out": str(tmp / "world")}), comm=comm)
    models = comm.allgather(world_run.state["model"])
    replicated = all(np.array_equal(m, models[0]) for m in models)
    diff = acc = None
    if comm.Get_rank() == 0:
        single = run_in_process(job.model_copy(update={"out": str(tmp / "self")}), comm=MPI.COMM_SELF)
        diff = float(np.abs(single.state["model"] - world_run.state["model"]).max())
        acc = abs(single.result.test_accuracy - world_run.result.test_accuracy)
    diff, acc = comm.bcast((diff, acc), root=0)
    return replicated, diff, acc


def assert_resume_matches(straight, resumed, tmp_path: Path, columns: tuple[str, ...], rounds: int = 6):
    """A resumed run ("parts") equals the uninterrupted one ("straight"): every server-state array,
    every round logged once, and the given log columns. Returns both logs' columns."""
    import numpy as np

    from hpcfed.io.metrics import read_metrics

    for key in straight.state:
        np.testing.assert_array_equal(resumed.state[key], straight.state[key])
    a = read_metrics(tmp_path / "straight" / "log.h5")[1]
    b = read_metrics(tmp_path / "parts" / "log.h5")[1]
    assert b["round"].tolist() == list(range(rounds))
    for col in columns:
        np.testing.assert_array_equal(a[col], b[col])
    return a, b
