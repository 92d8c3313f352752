"""The public API and user code (#15): hpcfed.run/resume/load_job, "module:attribute" references
for model, dataset, loss and algorithm, and what happens when they are wrong or raise.

The user code is a package written into a temporary folder (tests/userpkg.py), found there
because it is the job file's folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hpcfed
from hpcfed.io.metrics import read_metrics

from .conftest import ROOT, cli_env, run_mpi
from .conftest import hpcfed as hpcfed_cli
from .userpkg import write_job, write_package


@pytest.fixture
def lab(tmp_path):
    """A fresh user package per test: each test's own files, imported afresh."""
    from hpcfed import registry

    registry.forget_user_code()
    folder = write_package(tmp_path / "lab")
    yield folder
    registry.forget_user_code()
    if str(folder.resolve()) in sys.path:
        sys.path.remove(str(folder.resolve()))


def _run(job: Path, out: Path, *overrides: str) -> hpcfed.RunResult:
    return hpcfed.run(job, overrides=[f"out={out}", *overrides], progress=False)


def _model(result) -> dict[str, torch.Tensor]:
    return hpcfed.load_state_dict(result.checkpoint)


def _same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)
        else:
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- the public names


def test_public_names_are_importable():
    for name in ("run", "resume", "load_job", "UserError", "Strategy", "Update", "FederatedData",
                 "load_state_dict", "rng", "RunResult", "JobConfig", "RankFailed"):  # fmt: skip
        assert getattr(hpcfed, name) is not None, name
    assert callable(hpcfed.rng.torch_generator) and callable(hpcfed.rng.numpy_generator)
    from hpcfed.algorithms import FedAvg

    assert issubclass(FedAvg, hpcfed.Strategy)


def test_load_job_records_the_job_folder(lab):
    job = hpcfed.load_job(write_job(lab), ["rounds=2"])
    assert job.rounds == 2 and Path(job.job_dir) == lab.resolve()
    assert job.model.name == "mylab.nets:build" and job.data.dataset == "mylab.data:clients"


# --------------------------------------------------------------------------- user code runs, resumes


@pytest.mark.parametrize(
    "dataset,partition",
    [("mylab.data:clients", "natural"), ("mylab.data:lazy", "natural"), ("mylab.data:pooled", "dirichlet"),
     ("mylab.data:clients", "iid")],
    ids=["from_clients", "lazy", "pooled", "clients_repartitioned"],
)  # fmt: skip
def test_user_model_data_loss_train(lab, tmp_path, dataset, partition):
    result = _run(write_job(lab, dataset=dataset, partition=partition), tmp_path / "runs")
    assert result.rounds_done == 6 and result.stopped_by is None
    _, m = read_metrics(result.log_path)
    acc = m["test_accuracy"][np.isfinite(m["test_accuracy"])]
    assert acc[-1] > 0.8, acc  # three well-separated Gaussian classes
    assert m["train_loss"][-1] < m["train_loss"][0]


def test_lazy_and_given_clients_are_the_same_data(lab, tmp_path):
    a = _run(write_job(lab, dataset="mylab.data:clients", name="a"), tmp_path / "runs")
    b = _run(write_job(lab, dataset="mylab.data:lazy", name="b"), tmp_path / "runs")
    _same(_model(a), _model(b))


def test_user_code_resumes_exactly(lab, tmp_path):
    job = write_job(lab, algorithm="mylab.algos:Scaled")
    straight = _run(job, tmp_path / "runs", "name=straight")
    part = _run(job, tmp_path / "runs", "name=parts", "rounds=3")
    assert part.rounds_done == 3
    resumed = hpcfed.resume(part.run_dir, overrides=["rounds=6"], progress=False)
    assert resumed.rounds_done == 6
    _same(_model(straight), _model(resumed))
    a, b = read_metrics(straight.log_path)[1], read_metrics(resumed.log_path)[1]
    assert b["round"].tolist() == list(range(6))
    for col in ("train_loss", "bytes_up"):
        np.testing.assert_array_equal(a[col], b[col])
    for col in ("test_accuracy", "test_loss"):  # (the 3-round part also evaluated its last round)
        np.testing.assert_array_equal(a[col][[1, 3, 5]], b[col][[1, 3, 5]])


def test_resume_warns_when_user_source_changed(lab, tmp_path):
    job = write_job(lab)
    part = _run(job, tmp_path / "runs", "rounds=3")
    losses = lab / "mylab" / "losses.py"
    losses.write_text(losses.read_text() + "\n# edited after the checkpoint\n")
    with pytest.warns(UserWarning, match=r"losses\.py.*changed since round_000003\.h5"):
        hpcfed.resume(part.run_dir, overrides=["rounds=4"], progress=False)


def test_half_step_subclass_equals_server_lr_half(lab, tmp_path):
    """A user strategy subclassing FedAvg that halves the server step = FedAvg, server_lr 0.5."""
    job = write_job(lab, dataset="mylab.data:pooled", partition="dirichlet")
    mine = _run(job, tmp_path / "runs", "name=mine", "algorithm=mylab.algos:HalfStep")
    builtin = _run(job, tmp_path / "runs", "name=builtin", "fedavg.server_lr=0.5")
    _same(_model(mine), _model(builtin))


def test_strategy_from_scratch_equals_fedavg(lab, tmp_path):
    job = write_job(lab)
    mine = _run(job, tmp_path / "runs", "name=mine", "algorithm=mylab.algos:FromScratch")
    builtin = _run(job, tmp_path / "runs", "name=builtin")
    _same(_model(mine), _model(builtin), atol=1e-6)


def test_builtin_loss_by_reference_is_the_builtin(lab, tmp_path):
    """The registry has no back door: the built-in reached by its reference trains the same."""
    job = write_job(lab, loss="cross_entropy")
    a = _run(job, tmp_path / "runs", "name=a")
    b = _run(job, tmp_path / "runs", "name=b", "train.loss=hpcfed.losses:cross_entropy")
    c = _run(job, tmp_path / "runs", "name=c", 'model.name="hpcfed.models.mlp:build"',
             "model.options.hidden=[16]")  # fmt: skip
    d = _run(job, tmp_path / "runs", "name=d", "model.name=mlp", "model.hidden=[16]")
    _same(_model(a), _model(b))
    _same(_model(c), _model(d))


def test_regression_task_logs_loss_and_nan_accuracy(lab, tmp_path):
    job = write_job(
        lab, dataset="mylab.data:regression", partition="iid", model="mylab.nets:regression", loss="mse"
    )
    result = _run(job, tmp_path / "runs", "train.lr=0.05")
    _, m = read_metrics(result.log_path)
    evaluated = np.isfinite(m["test_loss"])
    assert evaluated.sum() == 3 and np.isnan(m["test_accuracy"]).all()
    losses = m["test_loss"][evaluated]
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.isnan(result.test_accuracy) and result.test_loss == losses[-1]


def test_mse_on_class_labels_is_one_hot():
    from hpcfed.losses import mse

    out = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # one-hot targets [[1, 0], [0, 1]]: squared errors 0, 0, 0.25, 0.25 -> mean 0.125
    assert mse(out, torch.tensor([0, 1])).item() == pytest.approx(0.125)


def test_run_takes_a_job_config_and_overrides(lab, tmp_path):
    job = hpcfed.load_job(write_job(lab), [f"out={tmp_path / 'runs'}"])
    result = hpcfed.run(job, overrides=["rounds=2"], progress=False)
    assert result.rounds_done == 2 and result.checkpoint.name == "round_000002.h5"


# --------------------------------------------------------------------------- bad input: exit 2


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD = [
    (["model.name=nosuch.nets:build"], ["model.name", "no module named 'nosuch'"]),
    (["model.name=mylab.nets:missing"], ["model.name", "has no attribute 'missing'"]),
    (["model.name=mylab.nets:NOT_CALLABLE"], ["model.name", "not callable"]),
    (["model.name=mylab.nets:not_a_module"], ["model.name", "expected a torch.nn.Module"]),
    (["model.name=perceptron"], ["model.name", "unknown name 'perceptron'", "module:attribute"]),
    (["data.dataset=mylab.data:wrong_type"], ["data.dataset", "expected a hpcfed.FederatedData"]),
    (["data.dataset=mylab.data:nope"], ["data.dataset", "no attribute 'nope'"]),
    (["data.dataset=mylab.data:pooled"], ["data.partition", "pooled"]),
    (["train.loss=mylab.nets:NOT_CALLABLE"], ["train.loss", "not callable"]),
    (["algorithm=mylab.algos:NotAStrategy"], ["algorithm", "subclass of hpcfed.Strategy"]),
    (["algorithm=mylab.algos:Scaled", "strategy.scale=-1"], ["strategy.scale", "greater than 0"]),
    (["algorithm=mylab.algos:Scaled", "strategy.factor=2"], ["strategy.factor", "unknown key"]),
    (["strategy.scale=2"], ["[strategy]", "fedavg"]),
    (["data.num_clients=40", "clients_per_round=4"], ["data.num_clients", "gives 12"]),
]


@pytest.mark.parametrize("overrides,needles", BAD, ids=[o[0].split("=")[1] for o, _ in BAD])
def test_bad_reference_is_exit_2_naming_the_key(lab, tmp_path, overrides, needles):
    _one_error_line(hpcfed_cli("run", write_job(lab), f"out={tmp_path}", *overrides, timeout=120), *needles)


def test_check_finds_errors_without_training(lab, tmp_path):
    ok = hpcfed_cli("check", write_job(lab), timeout=120)
    assert ok.returncode == 0 and ": ok" in ok.stdout and "mylab/nets.py" in ok.stdout, ok.stderr
    impure = write_job(lab, dataset="mylab.data:impure", partition="iid")
    _one_error_line(hpcfed_cli("check", impure, timeout=120), "data.dataset", "pure function")
    _one_error_line(hpcfed_cli("check", write_job(lab, model="mylab.nets:wrong_input"), timeout=120),
                    "model.name", "train.loss")  # fmt: skip
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- user exceptions: exit 1


def _mpirun(args: list[str], ranks: int, timeout: float = 90):
    return run_mpi(args, ranks, timeout)


@pytest.mark.parametrize("ranks", [0, 2, 3])
def test_user_exception_is_exit_1_traceback_once(lab, tmp_path, ranks):
    from hpcfed.rng import cohort

    job = hpcfed.load_job(write_job(lab))
    first = set(cohort(job.seed, 0, 12, 4).tolist())
    victim = min(set(cohort(job.seed, 1, 12, 4).tolist()) - first)  # trained in round 1 only
    args = ["-m", "hpcfed", "run", str(write_job(lab)), f"out={tmp_path / 'runs'}",
            "algorithm=mylab.algos:Boom", f"strategy.client={victim}", "checkpoint_every=1"]  # fmt: skip
    if ranks:
        proc, elapsed = _mpirun(args, ranks)
        print(f"{ranks} ranks: exit {proc.returncode} after {elapsed:.1f} s")
    else:
        proc = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120
        )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert proc.stderr.count(f"user bug in client {victim}") == 1
    assert "mylab/algos.py" in proc.stderr  # the user's own frame is in the traceback
    # nothing already written is lost: round 0 is logged and checkpointed
    _, m = read_metrics(tmp_path / "runs" / "user" / "log.h5")
    assert m["round"].tolist() == [0]
    assert (tmp_path / "runs" / "user" / "checkpoints" / "round_000001.h5").is_file()


def test_impure_dataset_is_refused_on_every_rank_count(lab, tmp_path):
    job = write_job(lab, dataset="mylab.data:impure", partition="iid")
    proc, _ = _mpirun(["-m", "hpcfed", "run", str(job), f"out={tmp_path}"], ranks=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcfed: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "ranks 0 and 1 built different datasets" in errors[0]


# --------------------------------------------------------------------------- __main__ and scripts


SCRIPT = """
import sys
import hpcfed
from hpcfed.algorithms import FedAvg

class Mine(FedAvg):
    pass

job = hpcfed.load_job(sys.argv[1], [f"out={sys.argv[2]}", "algorithm=__main__:Mine", "rounds=2"])
result = hpcfed.run(job, progress=False)
print("rounds", result.rounds_done)
"""


def test_user_code_in_main_runs_from_python_and_cli_resume_says_so(lab, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(write_job(lab)), str(tmp_path / "runs")],
                          capture_output=True, text=True, env=cli_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "rounds 2" in proc.stdout, proc.stderr[-3000:]
    _one_error_line(hpcfed_cli("resume", tmp_path / "runs" / "user", "rounds=3"), "__main__", "hpcfed.resume")
