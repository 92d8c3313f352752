"""Job files: validation, overrides, the resolved TOML."""

from __future__ import annotations

import tomllib

import pytest

from hpcfed.config import UserError, apply_overrides, load_job, parse_override, to_toml, validate

from .conftest import QUICKSTART


def test_quickstart_loads_with_defaults():
    job = load_job(QUICKSTART)
    assert job.algorithm == "fedavg" and job.data.num_clients == 100 and job.train.lr == 0.05
    assert job.checkpoint_keep == 3 and job.placement == "balanced"


@pytest.mark.parametrize(
    "text,path,value",
    [
        ("rounds=5", ["rounds"], 5),
        ("resfed.sparsity=0.99", ["resfed", "sparsity"], 0.99),
        ("out=scratch", ["out"], "scratch"),
        ('name="a b"', ["name"], "a b"),
        ("model.hidden=[32, 16]", ["model", "hidden"], [32, 16]),
        ("train.epochs = 2", ["train", "epochs"], 2),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("bad", ["rounds", "=5", "a..b=1", "1x=2"])
def test_bad_override_syntax(bad):
    with pytest.raises(UserError, match="override"):
        parse_override(bad)


def test_overrides_are_type_checked():
    with pytest.raises(UserError, match="'rounds'"):
        load_job(QUICKSTART, ["rounds=many"])
    with pytest.raises(UserError, match="'train.lr'"):
        load_job(QUICKSTART, ["train.lr=-1"])
    with pytest.raises(UserError, match="unknown key 'data.nmu_clients'"):
        load_job(QUICKSTART, ["data.nmu_clients=3"])
    assert load_job(QUICKSTART, ["data.num_clients=20", "clients_per_round=4"]).data.num_clients == 20


@pytest.mark.parametrize(
    "raw,match",
    [
        ({}, "missing required key 'algorithm'"),
        ({"algorithm": "fedsgd"}, "unknown algorithm 'fedsgd'"),
        ({"algorithm": "fedavg", "round": 3}, "unknown key 'round'"),
        ({"algorithm": "fedavg", "rounds": "3"}, "key 'rounds'"),
        ({"algorithm": "fedavg", "rounds": 2.5}, "key 'rounds'"),
        ({"algorithm": "fedavg", "data": {"dataset": "imagenet"}}, "key 'data.dataset'"),
        ({"algorithm": "fedavg", "data": {"dataset": "h5"}}, "data.path and data.test_path"),
        ({"algorithm": "fedavg", "clients_per_round": 200}, "exceeds data.num_clients"),
        ({"algorithm": "fedavg", "data": 3}, "key 'data'"),
    ],
)
def test_invalid_jobs_name_the_key(raw, match):
    with pytest.raises(UserError, match=match):
        validate(raw, "job.toml")


def test_override_into_non_table():
    with pytest.raises(UserError, match="not a table"):
        apply_overrides({"data": 3}, ["data.alpha=1"])


def test_resolved_toml_roundtrips():
    job = load_job(QUICKSTART, ["fedavg.server_optimizer=adam", "train.momentum=0.9"])
    again = validate(tomllib.loads(to_toml(job)), "resolved")
    assert again == job


def test_missing_and_non_toml_files(tmp_path):
    with pytest.raises(UserError, match="no such job file"):
        load_job(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is [not toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_job(bad)


def test_every_algorithm_the_schema_accepts_has_a_strategy():
    from hpcfed.algorithms import STRATEGIES
    from hpcfed.config import ALGORITHMS

    assert sorted(ALGORITHMS) == sorted(STRATEGIES)
