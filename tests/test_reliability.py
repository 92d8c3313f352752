"""Reliability: torn or corrupt checkpoints, a torn log, dead ranks.

- A corrupt newest checkpoint (truncated, a flipped byte in a dataset, no completeness marker) is
  skipped with a warning naming it; the run resumes from the one before, the log is cut back to
  it, and the result equals an uninterrupted run. No valid checkpoint: exit 2, one clear line.
- A log its writer left unusable (killed mid-append, or missing rows) is rebuilt from the
  checkpoint's ``history/`` on resume.
- SIGKILL of any rank, or an exception on one rank, ends the whole ``mpirun`` within 30 s, and the
  run then resumes to completion with every round logged once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcfed.config import load_job
from hpcfed.io.checkpoint import checkpoint_path, list_checkpoints
from hpcfed.io.metrics import read_metrics
from hpcfed.rng import cohort

from .conftest import QUICKSTART, ROOT, VENV_BIN, cli_env, hpcfed, run_in_process
from .test_jobs import FEMNIST, _corrupt_pixels, tff_pair

SMALL = ["data.num_clients=20", "clients_per_round=5", "eval_every=2", "checkpoint_every=2"]
DEAD_WITHIN = 30.0  # seconds from a rank's death to the end of the whole job


def _job(tmp_path, name, rounds):
    return load_job(QUICKSTART, [f"out={tmp_path}", f"name={name}", f"rounds={rounds}", *SMALL])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_tensor_byte(path: Path) -> None:
    with h5py.File(path, "r") as f:
        name = max(f["model"], key=lambda k: f["model"][k].size)  # the largest weight matrix
        offset = f["model"][name].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 17] ^= 0x10
    path.write_bytes(bytes(raw))


def _drop_marker(path: Path) -> None:
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]


@pytest.mark.parametrize("corrupt", [_truncate, _flip_a_tensor_byte, _drop_marker], ids=lambda f: f.__name__)
def test_corrupt_newest_checkpoint_falls_back_cuts_the_log_and_resumes_exactly(tmp_path, corrupt):
    straight = run_in_process(_job(tmp_path, "straight", 8))
    run_in_process(_job(tmp_path, "parts", 6))  # checkpoints after rounds 2, 4, 6
    newest = checkpoint_path(tmp_path / "parts", 6)
    corrupt(newest)
    with pytest.warns(UserWarning, match=r"skipping .*round_000006\.h5"):
        resumed = run_in_process(_job(tmp_path, "parts", 8), resume=True)
    np.testing.assert_array_equal(resumed.state["model"], straight.state["model"])
    _, cols = read_metrics(tmp_path / "parts" / "log.h5")
    assert cols["round"].tolist() == list(range(8))  # rounds 4 and 5 were cut, then redone once
    a = read_metrics(tmp_path / "straight" / "log.h5")[1]
    np.testing.assert_array_equal(cols["train_loss"], a["train_loss"])


def test_no_valid_checkpoint_is_exit_2_with_one_clear_line(tmp_path):
    run_in_process(_job(tmp_path, "quickstart", 4))
    for path in list_checkpoints(tmp_path / "quickstart"):
        _drop_marker(path)
    proc = hpcfed("resume", tmp_path / "quickstart")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcfed: error:")]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("hpcfed: warning:")]
    assert len(errors) == 1 and "no valid checkpoint to resume from" in errors[0], proc.stderr
    assert str(tmp_path / "quickstart" / "checkpoints") in errors[0]
    assert len(warnings) == 2 and "round_000004.h5" in warnings[0] and "round_000002.h5" in warnings[1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["torn", "short"])
def test_unusable_log_is_rebuilt_from_the_checkpoint(tmp_path, damage):
    run_in_process(_job(tmp_path, "parts", 4))
    log = tmp_path / "parts" / "log.h5"
    if damage == "torn":  # the writer killed mid-append
        _truncate(log)
    else:  # rows the writer never flushed: readable, but rounds 2 and 3 are missing
        with h5py.File(log, "a") as f:
            for name in f["metrics"]:
                f["metrics"][name].resize((2,))
    with pytest.warns(UserWarning, match="rebuilt from .*round_000004.h5"):
        run_in_process(_job(tmp_path, "parts", 6), resume=True)
    attrs, cols = read_metrics(log)
    assert cols["round"].tolist() == list(range(6)) and attrs["algorithm"] == "fedavg"
    assert np.isfinite(cols["train_loss"]).all()


# --------------------------------------------------------------------------- dead ranks


def _start_mpi(args: list[str], ranks: int = 2) -> subprocess.Popen:
    mpirun = VENV_BIN / "mpirun"
    cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(ranks), sys.executable, "-m", "hpcfed"]
    return subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT,
        start_new_session=True,  # its own process group: a hang is cleaned up with killpg
    )  # fmt: skip


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The hpcfed processes of this mpirun (its session), by MPI rank."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == launcher.pid:
            continue
        try:
            if os.getsid(int(entry.name)) != launcher.pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        for var in env:
            if var.startswith(b"OMPI_COMM_WORLD_RANK="):
                found[int(var.split(b"=")[1])] = int(entry.name)
    return found


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 180.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"mpirun ended before {what}:\n{proc.communicate()[1][-3000:]}")
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def _ends_within(proc: subprocess.Popen, seconds: float) -> tuple[float, str]:
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"mpirun still running {seconds:.0f} s after a rank died (hung)")
    return time.monotonic() - t0, err


def _log_rows(path: Path) -> int:
    try:
        return len(read_metrics(path)[1]["round"])
    except (OSError, KeyError):
        return 0


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_of_a_rank_ends_the_job_and_the_run_resumes(tmp_path, victim):
    """Rank 0 is also the log's writer: evaluating every round, it appends every round, so the kill
    often lands inside an append. The log must then be readable, or be rebuilt on resume."""
    run_dir = tmp_path / "quickstart"
    args = ["run", str(QUICKSTART), f"out={tmp_path}", "rounds=2000", "eval_every=1", "checkpoint_every=3"]
    proc = _start_mpi([*args, "data.num_clients=20", "clients_per_round=5"])
    _wait(lambda: (run_dir / "checkpoints" / "round_000003.h5").exists(), proc, "the first checkpoint")
    pid = _wait(lambda: _rank_pids(proc).get(victim), proc, f"rank {victim}'s pid")
    time.sleep(0.3)  # somewhere inside a later round
    os.kill(pid, signal.SIGKILL)
    elapsed, err = _ends_within(proc, DEAD_WITHIN)
    print(f"SIGKILL of rank {victim}: mpirun exited {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode != 0
    done = list_checkpoints(run_dir)[0]
    rounds_done = int(done.stem.split("_")[1])
    target = rounds_done + 3
    # the killed writer's log is readable, or the resume rebuilds it from the checkpoint (on one
    # rank here: a quicker start, and a resume need not use the interrupted job's rank count)
    resumed = hpcfed("resume", run_dir, f"rounds={target}")
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(run_dir / "log.h5")[1]["round"].tolist() == list(range(target))


def test_an_exception_on_one_rank_ends_the_job_and_the_run_resumes_once_fixed(tmp_path):
    """One client's data rots (a checksum error when read in round 1, by the one rank that trains
    it) while the other rank waits in the Allreduce: MPI_Abort ends both; with the file restored
    from a copy, the run resumes from its round-1 checkpoint and completes."""
    train, test = tff_pair(tmp_path, num_clients=6)
    pristine = tmp_path / "pristine.h5"
    shutil.copy(train, pristine)
    base = ["data.num_clients=6", "clients_per_round=2"]
    first, second = (set(cohort(0, r, 6, 2).tolist()) for r in (0, 1))
    with h5py.File(train, "r") as f:
        bad = sorted(f["examples"])[min(second - first)]
    _corrupt_pixels(train, bad)
    out = tmp_path / "runs"
    args = ["run", str(FEMNIST), f'out="{out}"', "rounds=4", "eval_every=1", "checkpoint_every=1", *base]
    proc = _start_mpi([*args, f'data.path="{train}"', f'data.test_path="{test}"'])
    run_dir = out / "fedavg-femnist"
    _wait(lambda: _log_rows(run_dir / "log.h5") >= 1, proc, "round 0")
    elapsed, err = _ends_within(proc, DEAD_WITHIN)
    print(f"exception on one rank: mpirun exited {proc.returncode} {elapsed:.1f} s after round 0 was logged")
    assert proc.returncode == 2 and f"examples/{bad}" in err, err[-3000:]
    shutil.copy(pristine, train)
    resumed = hpcfed("resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(run_dir / "log.h5")[1]["round"].tolist() == [0, 1, 2, 3]
