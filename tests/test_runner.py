"""The round engine in-process: resume exactness per configuration, real bytes, compression."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.config import load_job
from hpcfed.io.checkpoint import load_latest
from hpcfed.io.metrics import read_metrics

from .conftest import QUICKSTART, assert_resume_matches, run_in_process

SMALL = ["data.num_clients=20", "clients_per_round=5", "eval_every=2", "checkpoint_every=100"]
COMPRESS = ["compress.sparsity=0.9", "compress.quantization=uniform", "compress.bits=4"]


def _run(tmp_path, name, overrides, resume_from=None, rounds=6):
    job = load_job(QUICKSTART, [f"out={tmp_path}", f"name={name}", f"rounds={rounds}", *SMALL, *overrides])
    return run_in_process(job, resume=resume_from is not None)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["fedavg.server_optimizer=adam", "fedavg.server_lr=0.01", "train.momentum=0.9"],
        [
            *COMPRESS,
            "compress.error_feedback=true",
            "compress.direction=both",
            "compress.rounding=stochastic",
        ],
        ["model.name=cnn"],  # dropout: keyed per client
    ],
)
def test_resume_equals_uninterrupted(tmp_path, overrides):
    straight = _run(tmp_path, "straight", overrides)
    _run(tmp_path, "parts", overrides, rounds=3)
    resumed = _run(tmp_path, "parts", overrides, resume_from=True)
    a, b = assert_resume_matches(straight, resumed, tmp_path, ("train_loss", "bytes_up", "bytes_down"))
    # the interrupted run also evaluated after its last round (round 3): compare the common rows
    evaluated = ~np.isnan(a["test_accuracy"])
    np.testing.assert_array_equal(a["test_accuracy"][evaluated], b["test_accuracy"][evaluated])


def test_bytes_are_real_message_lengths(tmp_path):
    run = _run(tmp_path, "plain", [], rounds=2)
    _, cols = read_metrics(tmp_path / "plain" / "log.h5")
    one_message = len(run.strategy.codec.encode(run.state["model"], {})[0])
    assert one_message == 4 * run.flat.size + 25  # float32 payload behind the versioned header
    assert cols["bytes_up"].tolist() == [5 * one_message] * 2
    assert cols["bytes_down"].tolist() == [5 * one_message] * 2


def test_compression_shrinks_uplink_and_keeps_residuals(tmp_path):
    plain = read_metrics(_run(tmp_path, "plain", [], rounds=3).run_dir / "log.h5")[1]
    run = _run(tmp_path, "ef", [*COMPRESS, "compress.error_feedback=true"], rounds=3)
    comp = read_metrics(run.run_dir / "log.h5")[1]
    assert (comp["bytes_up"] * 20 < plain["bytes_up"]).all()
    assert comp["bytes_down"].tolist() == plain["bytes_down"].tolist()  # direction = "up"
    assert run.strategy.placement == "fixed"  # residuals live on the clients' home ranks
    residuals = run.strategy.extra_state()
    assert residuals and all(np.abs(r).sum() > 0 for r in residuals.values())
    ckpt = load_latest(run.run_dir)
    assert sorted(ckpt.groups["clients"]) == sorted(residuals)


def test_downlink_compression_counts_compressed_step(tmp_path):
    run = _run(tmp_path, "down", [*COMPRESS, "compress.direction=down"], rounds=3)
    cols = read_metrics(run.run_dir / "log.h5")[1]
    full = cols["bytes_down"][0]
    assert full == cols["bytes_up"][0]  # round 0 sends the full model
    assert (cols["bytes_down"][1:] * 5 < full).all()
