"""Hostile input: fuzzed job files and overrides (always exit 0 or 2 with one line naming the key,
never a traceback), fuzzed federated HDF5 files (loaded or refused with UserError, never another
exception), and data that would run code if unpickled (refused, never run).

The CLI runs in-process (``cli.main``), about a hundred times faster than a subprocess per example;
``rundir`` validates a job exactly as ``run`` does, without training it."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcfed import cli
from hpcfed.config import DataConfig, JobConfig, ModelConfig, UserError
from hpcfed.data import load_federated
from hpcfed.io.checkpoint import load_checkpoint, load_latest, load_state_dict, save_checkpoint
from hpcfed.models import build_model

from .test_data import _Evil  # a pickle that would run a command

FUZZ = settings(
    max_examples=int(os.environ.get("HPCFED_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def _assert_clean(code: int, err: str, *names: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err, err
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("hpcfed: error:")]
        assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
        assert any(n in errors[0] for n in names), (names, errors[0])


# --------------------------------------------------------------------------- job files


def _key_paths(model=JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (tables' keys included), from the pydantic models."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        ann = field.annotation
        for sub in (ann, *getattr(ann, "__args__", ())):
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                paths += _key_paths(sub, f"{prefix}{name}.")
    return paths


KEYS = _key_paths()
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
SCALARS = st.one_of(
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    WORDS,
    st.sampled_from(["fedavg", "prism", "median", "mlp", "cnn", "h5", "natural", "largest", ""]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(WORDS, SCALARS, max_size=2))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == -float("inf") else repr(v))
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{ " + ", ".join(f"{_toml(str(k))} = {_toml(x)}" for k, x in v.items()) + " }"


def _write_job(folder: Path, raw: dict) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for table, values in ((k, v) for k, v in raw.items() if isinstance(v, dict)):
        lines.append(f"[{table}]")
        lines += [f"{_toml(str(k))} = {_toml(v)}" for k, v in values.items()]
    path = folder / "job.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@FUZZ
@given(key=st.one_of(st.sampled_from(KEYS), st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8})?", fullmatch=True)),
       value=VALUES)  # fmt: skip
def test_fuzzed_job_file_key_is_accepted_or_named(capsys, key, value):
    raw: dict = {"algorithm": "fedavg", "out": "runs"}
    table, _, leaf = key.rpartition(".")
    (raw.setdefault(table, {}) if table else raw)[leaf] = value
    with tempfile.TemporaryDirectory() as d:
        if table and not isinstance(raw[table], dict):
            return
        code, err = _cli(capsys, "rundir", str(_write_job(Path(d), raw)))
    # the key, an unknown table holding it, or its last part (a cross-key rule such as
    # "dataset 'h5' needs data.path")
    _assert_clean(code, err, f"'{key}'", f"'{table}'", leaf, "not valid TOML")


@FUZZ
@given(overrides=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), WORDS), WORDS), min_size=1, max_size=3))
def test_fuzzed_overrides_are_accepted_or_named(capsys, overrides):
    texts = [f"{k}={v}" for k, v in overrides]
    code, err = _cli(capsys, "rundir", "jobs/quickstart.toml", *texts)
    names = [k for k, _ in overrides] + [k.rpartition(".")[2] for k, _ in overrides] + ["override"]
    _assert_clean(code, err, *[n for n in names if n])


@FUZZ
@given(text=st.text(max_size=200))
def test_fuzzed_job_text(capsys, text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "job.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        code, err = _cli(capsys, "rundir", str(path))
    _assert_clean(code, err, str(path), "algorithm")


def test_a_resume_override_other_than_rounds_is_named(capsys, tmp_path):
    (tmp_path / "config.toml").write_text('algorithm = "fedavg"\n')
    code, err = _cli(capsys, "resume", str(tmp_path), "train.lr=0.1")
    assert code == 2 and "only rounds=N" in err and "Traceback" not in err


# --------------------------------------------------------------------------- dataset files

CLIENT = st.fixed_dictionaries(
    {
        "key": st.sampled_from(["pixels", "image"]),
        "dtype": st.sampled_from(["float32", "uint8", "int64", "bool", "str"]),
        "n": st.integers(0, 3),
        "shape": st.sampled_from([(6, 6), (4, 4, 3), (5,), ()]),
        "label_dtype": st.sampled_from(["int32", "int64", "float32", "uint8"]),
        "labels": st.lists(st.integers(-2, 12), min_size=0, max_size=4),
        "label_2d": st.booleans(),
        "one_label_too_many": st.booleans(),
    }
)


def _write_client(group, c) -> None:
    n = c["n"]
    shape = (n, *c["shape"])
    if c["dtype"] == "str":
        group.create_dataset(c["key"], data=np.full(shape, b"x", dtype=object), dtype=h5py.string_dtype())
    else:
        group.create_dataset(c["key"], data=np.ones(shape, dtype=c["dtype"]))
    count = n + c["one_label_too_many"]
    labels = np.resize(np.array(c["labels"] or [0]), count).astype(c["label_dtype"])
    group.create_dataset("label", data=labels[:, None] if c["label_2d"] else labels)


@FUZZ
@given(
    train=st.lists(CLIENT, min_size=1, max_size=3),
    test=CLIENT,
    num_classes=st.one_of(st.none(), st.integers(1, 12)),
)
def test_fuzzed_h5_datasets_load_or_are_refused(train, test, num_classes):
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, clients in (("train", train), ("test", [test])):
            path = Path(d) / f"{name}.h5"
            with h5py.File(path, "w") as f:
                if num_classes is not None and name == "train":
                    f.attrs["num_classes"] = num_classes
                for i, c in enumerate(clients):
                    _write_client(f.create_group(f"examples/c{i}"), c)
            paths.append(str(path))
        cfg = DataConfig(dataset="h5", path=paths[0], test_path=paths[1], partition="natural", num_clients=1)
        try:
            ds = load_federated(cfg, seed=0)
            x, y = ds.client(0)
            xt, yt = ds.test
            build_model(ModelConfig(name="mlp"), ds.input_shape, ds.num_classes)
        except UserError as exc:
            assert "\n" not in str(exc) and ("data.path" in str(exc) or "data.test_path" in str(exc)), exc
            return
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y) > 0
    for labels in (y, yt):
        assert labels.numel() == 0 or (0 <= int(labels.min()) and int(labels.max()) < ds.num_classes)


def _client_file(path: Path, **datasets) -> str:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(f"examples/a/{name}", data=data)
    return str(path)


@pytest.mark.parametrize(
    "datasets,needle",
    [
        ({"pixels": np.zeros((0, 4, 4), np.float32), "label": np.zeros(0, np.int32)}, "no samples"),
        ({"pixels": np.zeros((2, 4, 4), np.float32), "label": np.array([0.0, 1.0])}, "integer labels"),
        ({"pixels": np.zeros((2, 4, 4), bool), "label": np.array([0, 1])}, "dtype bool"),
        ({"pixels": np.zeros((2, 4, 4), np.float32), "label": np.array([0, -1])}, "holds -1"),
    ],
    ids=["empty-client", "float-labels", "bool-pixels", "negative-label"],
)
def test_h5_validation_names_file_client_and_problem(tmp_path, datasets, needle):
    good = _client_file(tmp_path / "good.h5", pixels=np.zeros((2, 4, 4), np.float32), label=np.array([0, 1]))
    bad = _client_file(tmp_path / "bad.h5", **datasets)
    cfg = DataConfig(dataset="h5", path=bad, test_path=good, partition="natural", num_clients=1)
    with pytest.raises(UserError, match=needle) as exc:
        load_federated(cfg, seed=0)
    assert "data.path" in str(exc.value) and "bad.h5" in str(exc.value) and "examples/a" in str(exc.value)


def test_h5_label_beyond_num_classes_attribute_is_refused_when_read(tmp_path):
    train = _client_file(
        tmp_path / "train.h5", pixels=np.zeros((2, 4, 4), np.float32), label=np.array([0, 7])
    )
    with h5py.File(train, "a") as f:
        f.attrs["num_classes"] = 5  # the scan trusts it and skips reading labels; the read checks
    test = _client_file(tmp_path / "test.h5", pixels=np.zeros((2, 4, 4), np.float32), label=np.array([0, 1]))
    ds = load_federated(
        DataConfig(dataset="h5", path=train, test_path=test, partition="natural", num_clients=1), 0
    )
    with pytest.raises(UserError, match=r"train.h5: examples/a/label holds 7; expected labels in \[0, 5\)"):
        ds.client(0)


# --------------------------------------------------------------------------- never unpickle


def test_a_pickle_inside_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    model = {"w": np.ones((2, 2), np.float32)}
    groups = {"server": {"blob": np.frombuffer(payload, np.uint8)}}
    path = save_checkpoint(tmp_path, 2, {"algorithm": "fedavg", "config": payload.hex()}, model, groups, 3)
    ckpt = load_checkpoint(path)  # bytes stay bytes
    assert ckpt.groups["server"]["blob"].tobytes() == payload and not marker.exists()
    with h5py.File(path, "a") as f:  # now as an opaque object where a tensor belongs
        f["model"].create_dataset("evil", data=np.void(payload))
    with pytest.raises(UserError, match=r"model/evil has dtype .*expected a numeric tensor"):
        load_state_dict(path)
    with (
        pytest.warns(UserWarning, match="round_000002.h5"),
        pytest.raises(UserError, match="no valid checkpoint"),
    ):
        load_latest(tmp_path)
    assert not marker.exists()


def test_a_torch_pickle_in_a_torchvision_root_is_never_loaded(tmp_path):
    """torchvision's processed/*.pt files are torch.save pickles: hpcfed reads only the raw IDX files."""
    marker = tmp_path / "pwned"
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        torch.save(_Evil(marker), processed / name)
    cfg = DataConfig(dataset="mnist", path=str(tmp_path), partition="iid", num_clients=2)
    with pytest.raises(UserError, match="MNIST/raw"):
        load_federated(cfg, seed=0)
    assert not marker.exists()
