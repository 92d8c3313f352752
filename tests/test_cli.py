"""The command line: exit codes, bad input, resume exactness, stop signals, MPI runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcfed.checkpoint import list_checkpoints, load_state_dict
from hpcfed.io.metrics import read_metrics

from .conftest import QUICKSTART, ROOT, cli_env, hpcfed


def _final_model(run_dir):
    return load_state_dict(list_checkpoints(run_dir)[0])


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "content,overrides,needles",
    [
        ('algorithm = "fedavg"\nrounds = 3\nfoo = 1\n', [], ["job.toml", "unknown key 'foo'"]),
        ('algorithm = "fedavg"\nrounds = "three"\n', [], ["'rounds'"]),
        ('algorithm = "fedsgd"\n', [], ["unknown algorithm 'fedsgd'"]),
        ('algorithm = "fedavg"\n', ["train.lr=fast"], ["'train.lr'"]),
        ('algorithm = "fedavg"\n', ["rounds"], ["override 'rounds'", "dotted.key=value"]),
        (
            'algorithm = "fedavg"\n[data]\ndataset = "mnist"\npath = "/nonexistent/root"\n',
            [],
            ["data.path", "/nonexistent/root"],
        ),
        ("algorithm = fedavg\n", [], ["job.toml", "not valid TOML"]),
    ],
)
def test_bad_input_is_exit_2_one_line(tmp_path, content, overrides, needles):
    job = tmp_path / "job.toml"
    job.write_text(content)
    _one_error_line(hpcfed("run", job, f"out={tmp_path}", *overrides), *needles)


def test_missing_job_file_and_bad_run_folder(tmp_path):
    _one_error_line(hpcfed("run", tmp_path / "missing.toml"), "missing.toml", "no such job file")
    _one_error_line(hpcfed("resume", tmp_path), "config.toml", "not found")
    _one_error_line(hpcfed("info", tmp_path / "nothing"), "nothing")
    _one_error_line(hpcfed("frobnicate"), "invalid choice")


def test_run_resume_equals_uninterrupted_and_protects_runs(tmp_path, small_overrides):
    straight = hpcfed("run", QUICKSTART, *small_overrides, "rounds=6", "name=straight")
    assert straight.returncode == 0, straight.stderr
    assert "test accuracy" in straight.stdout
    part = hpcfed("run", QUICKSTART, *small_overrides, "rounds=3", "name=parts")
    assert part.returncode == 0, part.stderr
    run_dir = tmp_path / "parts"
    log_before = (run_dir / "log.h5").read_bytes()
    again = hpcfed("run", QUICKSTART, *small_overrides, "rounds=3", "name=parts")
    _one_error_line(again, "already holds a run")
    assert (run_dir / "log.h5").read_bytes() == log_before  # nothing written is touched
    _one_error_line(hpcfed("resume", run_dir, "seed=3"), "only rounds=N")
    resumed = hpcfed("resume", run_dir, "rounds=6")
    assert resumed.returncode == 0, resumed.stderr
    assert _max_diff(_final_model(tmp_path / "straight"), _final_model(run_dir)) <= 1e-6
    _, cols = read_metrics(run_dir / "log.h5")
    assert cols["round"].tolist() == list(range(6))
    assert (cols["wall_time"][1:] >= cols["wall_time"][:-1]).all()  # the count continues
    info = hpcfed("info", run_dir)
    assert info.returncode == 0 and "rounds done    6" in info.stdout


def _wait_for_rows(log, rows, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            if len(read_metrics(log)[1]["round"]) >= rows:
                return
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError("the run made no progress")


@pytest.mark.parametrize("ranks", [0, 2])
def test_stop_signal_checkpoints_exits_0_and_resumes(tmp_path, small_overrides, ranks):
    """SIGUSR1 (what SLURM sends before the time limit) mid-run: checkpoint, exit 0, resume exactly."""
    args = [*small_overrides, "rounds=400", "eval_every=1", "checkpoint_every=1000"]
    cmd = [sys.executable, "-m", "hpcfed", "run", str(QUICKSTART), *args]
    if ranks:
        cmd = [
            str(ROOT / ".venv/bin/mpirun") if (ROOT / ".venv/bin/mpirun").exists() else "mpirun",
            "-n",
            str(ranks),
            *cmd,
        ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    run_dir = tmp_path / "quickstart"
    _wait_for_rows(run_dir / "log.h5", 3, proc)
    proc.send_signal(signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "hpcfed resume" in out
    stopped_at = read_metrics(run_dir / "log.h5")[1]["round"].size
    assert 3 <= stopped_at < 400 and list_checkpoints(run_dir)
    resumed = hpcfed("resume", run_dir, "rounds=" + str(stopped_at + 2), ranks=ranks)
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(run_dir / "log.h5")[1]["round"].tolist() == list(range(stopped_at + 2))


def test_mpirun_ranks_agree_with_serial(tmp_path, small_overrides):
    serial = hpcfed("run", QUICKSTART, *small_overrides, "name=one")
    two = hpcfed("run", QUICKSTART, *small_overrides, "name=two", ranks=2)
    assert serial.returncode == 0 and two.returncode == 0, two.stderr
    assert _max_diff(_final_model(tmp_path / "one"), _final_model(tmp_path / "two")) <= 1e-4
    a, b = read_metrics(tmp_path / "one" / "log.h5")[1], read_metrics(tmp_path / "two" / "log.h5")[1]
    assert a["bytes_up"].tolist() == b["bytes_up"].tolist()
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)


def test_bad_input_under_mpirun_is_exit_2(tmp_path):
    proc = hpcfed("run", QUICKSTART, f"out={tmp_path}", "rounds=-1", ranks=2)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("hpcfed: error:") == 1 and "'rounds'" in proc.stderr


def test_bench_kernels_json():
    import json

    proc = hpcfed("bench", "kernels", "--json", "--sizes", "20000", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {r["kernel"] for r in rows} >= {"topk_abs", "quantize_uniform 4b"}
