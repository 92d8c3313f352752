"""slurm/hpcfed.sbatch on a real SLURM cluster: stop on B:USR1, checkpoint, requeue, resume.

Skipped unless `sbatch`, `sinfo`, `scontrol` and `scancel` are on PATH and a node is idle
(../shared/tools/local-slurm.sh starts a one-node cluster). The job's files go to pytest's tmp
folder, which must be visible to the compute node: on a multi-node cluster point
HPCFED_SLURM_TMPDIR at a shared folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import QUICKSTART, ROOT, VENV_BIN

pytestmark = pytest.mark.slurm

SBATCH = ROOT / "slurm" / "hpcfed.sbatch"
ROUNDS = 8
DEADLINE = 175.0  # seconds for the whole test


def _require_slurm() -> None:
    missing = [c for c in ("sbatch", "sinfo", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SLURM not available ({', '.join(missing)} not on PATH)")
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-t", "idle", "-o", "%D"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"sinfo failed: {exc}")
    if out.returncode != 0:
        pytest.skip(f"sinfo failed: {out.stderr.strip()}")
    if sum(int(n) for n in out.stdout.split() if n.isdigit()) == 0:
        pytest.skip("no idle SLURM node")


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20
    )
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait_for(what: str, cond, deadline: float, log: Path, interval: float = 0.2):
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    text = log.read_text() if log.exists() else "(no output file)"
    pytest.fail(f"timed out waiting for {what}; job output:\n{text[-4000:]}")


@pytest.fixture
def slurm_dir(tmp_path):
    base = os.environ.get("HPCFED_SLURM_TMPDIR")
    if not base:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="hpcfed-slurm-test-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_usr1_checkpoints_requeues_and_resumes(slurm_dir):
    _require_slurm()
    h5py = pytest.importorskip("h5py")
    deadline = time.monotonic() + DEADLINE
    out_dir = slurm_dir / "runs"
    log = slurm_dir / "job.out"
    run_dir = out_dir / "quickstart"
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # this venv's python and mpirun
    env["HPCFED_PYTHON"] = sys.executable
    env.pop("HPCFED_LAUNCHER", None)
    # Rounds slow enough (about half a second each) to signal the job mid-run.
    overrides = [
        f"out={out_dir}",
        f"rounds={ROUNDS}",
        "checkpoint_every=2",
        "eval_every=2",
        "train.epochs=40",
    ]
    sub = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks=2",
            "--time=5",
            "--job-name=hpcfed-pytest",
            f"--output={log}",
            f"--chdir={slurm_dir}",
            str(SBATCH),
            str(QUICKSTART),
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    try:
        # Once round 2 is checkpointed every rank is inside the round loop (signal handlers set).
        _wait_for(
            "the first checkpoint",
            lambda: (run_dir / "checkpoints" / "round_000002.h5").exists(),
            deadline,
            log,
        )
        # What --signal=B:USR1@120 does before the time limit: signal the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=20)

        def requeued():
            info = _job(job_id)
            return int(info.get("Restarts", "0")) >= 1 and info.get("JobState") in (
                "PENDING",
                "RUNNING",
                "COMPLETED",
            )

        _wait_for("the requeue", requeued, deadline, log, interval=0.5)
        # SLURM holds a requeued job for about two minutes (BeginTime); let it start sooner. Not in the
        # same second as the requeue: slurmd would refuse the new credential as revoked.
        subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"], capture_output=True, timeout=20
        )

        def finished():
            info = _job(job_id)
            state = info.get("JobState", "")
            if state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
                return None
            return info or {"JobState": "(forgotten)"}

        info = _wait_for("the requeued job to finish", finished, deadline, log, interval=1.0)
    finally:
        if _job(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"):
            subprocess.run(["scancel", job_id], capture_output=True, timeout=20)

    text = log.read_text()
    assert info["JobState"] in ("COMPLETED", "(forgotten)"), f"{info}\n{text}"
    if "ExitCode" in info:
        assert info["ExitCode"] == "0:0", text
    assert "received SIGUSR1" in text and "requeueing job" in text, text
    assert f"resume {run_dir}" in text, text  # the requeued job resumed the run folder
    with h5py.File(run_dir / "log.h5", "r") as f:
        rounds = f["metrics/round"][:].tolist()
    assert rounds == list(range(ROUNDS)), text
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.h5"))
    assert checkpoints[-1] == f"round_{ROUNDS:06d}.h5"
