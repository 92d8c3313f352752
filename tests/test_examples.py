"""Every example in examples/ runs end to end, small (docs/api.md points researchers at them)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hpcfed.io.metrics import read_metrics

from .conftest import ROOT, VENV_BIN, cli_env, hpcfed

EXAMPLES = ROOT / "examples"
JOBS = sorted(EXAMPLES.glob("*/job.toml"))


def test_examples_are_discovered():
    assert {p.parent.name for p in JOBS} >= {"custom_model_data", "custom_algorithm"}


@pytest.mark.parametrize("job", JOBS, ids=[p.parent.name for p in JOBS])
def test_example_job_runs_and_learns(tmp_path, job):
    # from another folder: the user modules are found beside the job file, not in the cwd
    proc = hpcfed("run", job, f"out={tmp_path}", "rounds=10", "eval_every=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    _, m = read_metrics(run_dir / "log.h5")
    assert m["round"].tolist() == list(range(10))
    assert m["test_accuracy"][-1] > 0.5, m["test_accuracy"]  # ten digits classes: chance is 0.1


@pytest.mark.parametrize("ranks", [0, 2])
def test_sweep_script(tmp_path, ranks):
    cmd = [sys.executable, str(EXAMPLES / "sweep.py"), "--rounds", "5", "--out", str(tmp_path)]
    if ranks:
        mpirun = VENV_BIN / "mpirun"
        cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[0] == "train.lr" and len(lines) == 4, proc.stdout  # printed once
    finals = [float(line.split()[1]) for line in lines[1:]]
    assert all(np.isfinite(finals))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr0.02", "lr0.05", "lr0.1"]
