import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpcfed.config import UserError
from hpcfed.io.plots import plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, algorithm="fedavg", rounds=10, eval_every=3, family=None, bytes_per_round=1000):
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rnd = np.arange(rounds, dtype=np.int64)
    acc = np.full(rounds, np.nan)
    evaluated = (rnd % eval_every == 0) | (rnd == rounds - 1)
    acc[evaluated] = np.linspace(0.1, 0.9, evaluated.sum())
    with h5py.File(run_dir / "log.h5", "w") as f:
        f.attrs["algorithm"] = algorithm
        f.attrs["config"] = f'algorithm = "{algorithm}"\n'
        f.attrs["seed"] = 0
        f.attrs["world_size"] = 1
        f.attrs["hpcfed_version"] = "0.1.0"
        m = f.create_group("metrics")
        m["round"] = rnd
        m["test_accuracy"] = acc
        m["test_loss"] = np.where(evaluated, 1.0, np.nan)
        m["train_loss"] = rng.random(rounds)
        m["bytes_up"] = np.full(rounds, bytes_per_round, dtype=np.int64)
        m["bytes_down"] = np.full(rounds, 2 * bytes_per_round, dtype=np.int64)
        m["wall_time"] = np.cumsum(rng.random(rounds))
        m["sim_time"] = np.cumsum(rng.random(rounds) * 3)
        if family is not None:
            accuracy, macs = family
            g = f.create_group("family")
            g["accuracy"] = np.asarray(accuracy, dtype=np.float64)
            g.attrs["macs"] = np.asarray(macs, dtype=np.float64)
            g.attrs["subnets"] = json.dumps([{"depth": i} for i in range(len(macs))])
    return run_dir


def assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC
    return data


def png_width(data):
    return int.from_bytes(data[16:20], "big")  # IHDR width


def test_two_runs(tmp_path):
    a = write_log(tmp_path / "runs" / "fedavg_a")
    b = write_log(tmp_path / "runs" / "fedavg_b", bytes_per_round=10)
    out = plot_runs([a, b], tmp_path / "plots" / "cmp.png")
    assert out == tmp_path / "plots" / "cmp.png"
    assert png_width(assert_png(out)) > 0


def test_hadfl_and_family_add_panels(tmp_path):
    plain = write_log(tmp_path / "plain")
    base = png_width(assert_png(plot_runs([plain], tmp_path / "plain.png")))
    hadfl = write_log(tmp_path / "hadfl", algorithm="hadfl")
    three = png_width(assert_png(plot_runs([plain, hadfl], tmp_path / "hadfl.png")))
    accuracy = [[np.nan, np.nan, np.nan], [0.5, 0.6, 0.7], [0.55, np.nan, 0.75]]
    superfed = write_log(tmp_path / "superfed", algorithm="superfed", family=(accuracy, [1e6, 4e6, 9e6]))
    four = png_width(assert_png(plot_runs([plain, hadfl, superfed], tmp_path / "all.png")))
    assert base < three < four


def test_single_log_file_and_live_run_truncation(tmp_path):
    run = write_log(tmp_path / "live")
    with h5py.File(run / "log.h5", "a") as f:  # a writer caught between appends: round 10 is half written
        del f["metrics/round"]
        f["metrics/round"] = np.arange(11, dtype=np.int64)
    assert_png(plot_runs([run / "log.h5"], tmp_path / "live.png"))


def test_no_evaluations_still_plots(tmp_path):
    run = write_log(tmp_path / "empty", rounds=2, eval_every=100)
    with h5py.File(run / "log.h5", "a") as f:
        f["metrics/test_accuracy"][...] = np.nan
    assert_png(plot_runs([run], tmp_path / "empty.png"))


def test_missing_log_is_user_error(tmp_path):
    (tmp_path / "nolog").mkdir()
    with pytest.raises(UserError, match="log.h5"):
        plot_runs([tmp_path / "nolog"], tmp_path / "x.png")
    with pytest.raises(UserError, match="nowhere"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "x.png")
    with pytest.raises(UserError):
        plot_runs([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_unreadable_log_is_user_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "log.h5").write_bytes(b"this is not HDF5")
    with pytest.raises(UserError, match=r"bad/log\.h5") as info:
        plot_runs([bad], tmp_path / "x.png")
    assert "\n" not in str(info.value)

    nometrics = tmp_path / "nometrics"
    nometrics.mkdir()
    with h5py.File(nometrics / "log.h5", "w") as f:
        f.attrs["algorithm"] = "fedavg"
    with pytest.raises(UserError, match="metrics"):
        plot_runs([nometrics], tmp_path / "x.png")

    partial = write_log(tmp_path / "partial")
    with h5py.File(partial / "log.h5", "a") as f:
        del f["metrics/bytes_up"]
    with pytest.raises(UserError, match="bytes_up"):
        plot_runs([partial], tmp_path / "x.png")


def test_import_does_not_load_matplotlib():
    code = "import sys, hpcfed.io.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
