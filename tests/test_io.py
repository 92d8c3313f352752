"""HDF5 checkpoints and the metrics log."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from hpcfed.config import UserError
from hpcfed.io.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    load_state_dict,
    save_checkpoint,
)
from hpcfed.io.metrics import MetricsLog, read_metrics


def _save(tmp_path, rnd, keep=3, value=1.0):
    model = {"w": np.full((4, 4), value, np.float32), "steps": np.array(3, np.int64)}
    groups = {"server": {"momentum": np.arange(5.0)}, "clients": {}}
    return save_checkpoint(tmp_path, rnd, {"algorithm": "fedavg", "config": "x"}, model, groups, keep)


def test_checkpoint_roundtrip_and_prune(tmp_path):
    for r in (2, 4, 6, 8):
        _save(tmp_path, r, keep=3, value=r)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "round_000008.h5",
        "round_000006.h5",
        "round_000004.h5",
    ]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # no temporaries left behind
    ck = load_checkpoint(checkpoint_path(tmp_path, 8))
    assert ck.round == 8 and ck.attrs["algorithm"] == "fedavg"
    np.testing.assert_array_equal(ck.model["w"], 8.0)
    np.testing.assert_array_equal(ck.groups["server"]["momentum"], np.arange(5.0))


def test_state_dict_loads_strict(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    path = save_checkpoint(tmp_path, 1, {"algorithm": "fedavg"}, sd, {}, 3)
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    m2.load_state_dict(load_state_dict(path), strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_corrupt_checkpoint_detected_by_checksum(tmp_path):
    path = _save(tmp_path, 2)
    with h5py.File(path, "r") as f:
        offset = f["model/w"].id.get_offset() if f["model/w"].id.get_offset() else None
        chunk_offset = f["model/w"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[(offset or chunk_offset) + 5] ^= 0xFF  # flip bits inside the tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="unreadable checkpoint"):
        load_checkpoint(path)


def test_client_state_streams_in_is_read_lazily_and_is_checksummed(tmp_path):
    """clients/ may be written from a generator (the engine streams it from every rank) and is
    read per dataset; a flipped byte in it still fails the whole checkpoint at load time."""
    arrays = {f"resfed.up.server.{c}": np.full((2, 6), c, np.float32) for c in range(5)}
    model = {"w": np.zeros(3, np.float32)}
    path = save_checkpoint(tmp_path, 1, {"algorithm": "resfed"}, model, {"clients": iter(arrays.items())}, 3)
    ck = load_checkpoint(path)
    lazy = ck.groups["clients"]
    assert sorted(lazy) == sorted(arrays) and len(lazy) == 5
    np.testing.assert_array_equal(lazy["resfed.up.server.3"], arrays["resfed.up.server.3"])
    lazy.close()
    with h5py.File(path, "r") as f:
        offset = f["clients/resfed.up.server.4"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="unreadable checkpoint"):
        load_checkpoint(path)


def test_torn_checkpoint_falls_back_to_older(tmp_path):
    _save(tmp_path, 2, value=2)
    newest = _save(tmp_path, 4, value=4)
    newest.write_bytes(newest.read_bytes()[:300])  # truncated
    with pytest.warns(UserWarning, match="round_000004.h5"):
        ck = load_latest(tmp_path)
    assert ck.round == 2


def test_missing_marker_is_incomplete(tmp_path):
    path = _save(tmp_path, 2)
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(UserError, match="incomplete"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="no valid checkpoint"):
        load_latest(tmp_path)


def _row(r, acc=float("nan")):
    return {
        "round": r,
        "test_accuracy": acc,
        "test_loss": acc,
        "train_loss": 1.0,
        "bytes_up": 10,
        "bytes_down": 20,
        "wall_time": float(r),
        "sim_time": float(r),
    }


def test_metrics_log_append_flush_truncate(tmp_path):
    log = MetricsLog(tmp_path / "log.h5", flush_seconds=3600)
    log.create({"algorithm": "fedavg", "world_size": 1})
    log.append(_row(0))
    _, cols = read_metrics(tmp_path / "log.h5")  # readable while rows are pending
    assert len(cols["round"]) == 0
    log.append(_row(1, 0.5), force=True)
    log.append({**_row(2), "epsilon": 1.5}, force=True)  # optional column appears late
    attrs, cols = read_metrics(tmp_path / "log.h5")
    assert attrs["algorithm"] == "fedavg"
    assert cols["round"].tolist() == [0, 1, 2] and cols["bytes_up"].dtype == np.int64
    assert np.isnan(cols["epsilon"][:2]).all() and cols["epsilon"][2] == 1.5
    assert {len(c) for c in cols.values()} == {3}
    log.append(_row(3))
    hist = log.history()
    assert hist["round"].tolist() == [0, 1, 2, 3]
    log.flush()
    log.truncate(2)
    _, cols = read_metrics(tmp_path / "log.h5")
    assert cols["round"].tolist() == [0, 1] and len(cols["epsilon"]) == 2


def test_metrics_log_rebuild(tmp_path):
    log = MetricsLog(tmp_path / "log.h5")
    log.create({"algorithm": "fedavg"})
    for r in range(3):
        log.append(_row(r), force=True)
    hist = log.history()
    (tmp_path / "log.h5").write_bytes(b"garbage")
    log.rebuild({"algorithm": "fedavg"}, hist)
    _, cols = read_metrics(tmp_path / "log.h5")
    assert cols["round"].tolist() == [0, 1, 2]


def test_a_reader_holding_the_log_never_crashes_the_writer(tmp_path):
    log = MetricsLog(tmp_path / "log.h5", flush_seconds=0)
    log.create({"algorithm": "fedavg"})
    # a user's reader in another process, with HDF5's default file lock, holding the file open
    code = "import h5py, sys, time; f = h5py.File(sys.argv[1]); print('open', flush=True); time.sleep(30)"
    cmd = [sys.executable, "-c", code, str(tmp_path / "log.h5")]
    reader = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        log.append(_row(0))  # locked: the row stays pending, no exception
        assert len(log.pending) == 1
        with pytest.warns(UserWarning, match="locked"):
            log.flush(wait=0.2)  # a final append writes anyway, after waiting
    finally:
        reader.kill()
        reader.wait()
    log.append(_row(1), force=True)
    assert read_metrics(tmp_path / "log.h5")[1]["round"].tolist() == [0, 1]
