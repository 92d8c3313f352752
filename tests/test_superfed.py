"""SuperFed: aggregation maths by hand, the schedule, assignment, elastic models, family/ and export."""

from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch

from hpcfed.algorithms.base import Update, weighted_mean
from hpcfed.algorithms.superfed import (
    Distilling,
    client_weight,
    cohort_contribution,
    contribution,
    distill_loss,
    maxnet_beta,
    sandwich,
)
from hpcfed.config import ModelConfig, SuperFedConfig, UserError, load_job, to_toml, validate
from hpcfed.flat import FlatModel
from hpcfed.io.metrics import read_metrics
from hpcfed.models import build_model
from hpcfed.models.elastic import elastic_space, extract, make_subnet, prefix_index, scatter
from hpcfed.models.factorized import count_macs

from .conftest import QUICKSTART, hpcfed, run_in_process


def total(*updates: Update) -> Update:
    return Update(sum(u.value for u in updates), sum(u.weight for u in updates))


# --------------------------------------------------------------------------- aggregation by hand


def test_one_client_with_the_full_net_gives_exactly_its_model():
    rng = np.random.default_rng(0)
    old, theta = rng.normal(size=50).astype(np.float32), rng.normal(size=50).astype(np.float32)
    new = weighted_mean(contribution(50, np.arange(50), theta, 0.37), old).astype(np.float32)
    np.testing.assert_array_equal(new, theta)


def test_disjoint_overlapping_and_uncovered_elements():
    old = np.arange(10, dtype=np.float32)
    a = contribution(10, np.array([0, 1, 2, 5]), np.full(4, 100.0), 0.9)  # the largest subnet
    b = contribution(10, np.array([3, 4, 5]), np.full(3, 200.0), 0.1)
    new = weighted_mean(total(a, b), old)
    np.testing.assert_array_equal(new[[0, 1, 2]], 100.0)  # only a covers them: a's value
    np.testing.assert_array_equal(new[[3, 4]], 200.0)  # only b: b's value, whatever its weight
    assert new[5] == pytest.approx((0.9 * 100 + 0.1 * 200) / 1.0)  # both: 110
    np.testing.assert_array_equal(new[6:], old[6:])  # nobody: unchanged


def test_sample_weighting_by_hand():
    # the largest subnet's client (share 0.5, 10 samples, θ = 1) and another (share 0.25, 40, θ = 4)
    assert client_weight(0.5, 10.0, "maxnet") == 0.5 and client_weight(0.5, 10.0, "samples") == 5.0
    for weighting, want in (("maxnet", (0.5 * 1 + 0.25 * 4) / 0.75), ("samples", (5 * 1 + 10 * 4) / 15)):
        a = contribution(1, np.array([0]), np.array([1.0]), client_weight(0.5, 10.0, weighting))
        b = contribution(1, np.array([0]), np.array([4.0]), client_weight(0.25, 40.0, weighting))
        assert weighted_mean(total(a, b), np.zeros(1))[0] == pytest.approx(want)  # 2.0 and 3.0


def test_cohort_average_counts_non_covering_clients_as_unchanged():
    old = np.array([1.0, 2.0, 3.0, 4.0])
    a = cohort_contribution(old, np.array([0, 1]), np.array([10.0, 10.0]), 0.5)
    b = cohort_contribution(old, np.array([1, 2]), np.array([20.0, 20.0]), 0.25)
    new = weighted_mean(total(a, b), old)
    # element 0: a moves it, b (not covering) leaves it at 1; element 3: nobody covers it
    np.testing.assert_allclose(new, [(5 + 0.25) / 0.75, (5 + 5) / 0.75, (1.5 + 5) / 0.75, 4.0])
    a = contribution(4, np.array([0, 1]), np.array([10.0, 10.0]), 0.5)
    b = contribution(4, np.array([1, 2]), np.array([20.0, 20.0]), 0.25)
    covering = weighted_mean(total(a, b), old)
    np.testing.assert_allclose(covering, [10.0, 10 / 0.75, 20.0, 4.0])  # the paper's: covering clients only


def test_distillation_loss_and_targets_by_hand():
    logits = torch.log(torch.tensor([[1.0, 3.0]]))  # softmax (1/4, 3/4)
    packed = torch.tensor([[0.0, 0.5, 0.5]])  # label 0, teacher (1/2, 1/2)
    ce, soft = math.log(4), 0.5 * math.log(4) + 0.5 * math.log(4 / 3)
    loss = distill_loss(torch.nn.functional.cross_entropy, 0.25)(logits, packed)
    assert float(loss) == pytest.approx(0.75 * ce + 0.25 * soft)
    assert float(distill_loss(torch.nn.functional.cross_entropy, 0.0)(logits, packed)) == pytest.approx(ce)
    # the packed targets: the label, then the teacher's softmax on the same sample
    teacher = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[0.0], [math.log(3)]]))  # x = 1: logits (0, ln 3)

    class Trainer:
        loss = staticmethod(torch.nn.functional.cross_entropy)

        def train(self, x, y, generator):
            self.seen = y
            return 0.0, 1

    inner = Trainer()
    Distilling(inner, 0.25, teacher).train(torch.ones(2, 1), torch.tensor([1, 0]), None)
    torch.testing.assert_close(inner.seen, torch.tensor([[1.0, 0.25, 0.75], [0.0, 0.25, 0.75]]))


def test_maxnet_beta_schedule():
    beta = lambda t: maxnet_beta(t, rounds=100, beta0=0.9, beta_end=0.125, decay_fraction=0.8)  # noqa: E731
    assert beta(0) == pytest.approx(0.9)
    assert beta(40) == pytest.approx((0.9 + 0.125) / 2)  # T/2: halfway along the cosine
    assert beta(80) == pytest.approx(0.125) and beta(100) == pytest.approx(0.125)
    assert all(beta(t) > beta(t + 1) for t in range(80))  # decreasing until T


def test_default_weights_have_no_maxnet_phase_and_count_samples(tmp_path):
    from hpcfed.comm import world
    from hpcfed.runner import Run

    def strategy(*extra):
        job = tiny(tmp_path, "clients_per_round=4", "rounds=10", *extra)
        return Run(job, world(), job.run_dir, progress=False).strategy

    default, paper = strategy(), strategy("superfed.beta0=0.9", "superfed.weighting=maxnet")
    assert [default.beta(t) for t in (0, 4, 8, 10)] == [0.25] * 4  # β = β_end = 1/K throughout
    assert paper.beta(0) == pytest.approx(0.9) and paper.beta(8) == pytest.approx(0.25)
    assert default.cfg.weighting == "samples" and paper.cfg.weighting == "maxnet"
    # two largest-subnet clients a round, each with the role share β (here 0.3; the others 0.2)
    two = strategy("superfed.largest_clients=2", "superfed.beta0=0.3", "superfed.beta_end=0.3")
    two.plan(two.init_state(), 0)
    roles = sorted((spec == two.space.largest(), round(w, 12)) for spec, w in two._plan.values())
    assert roles == [(False, 0.2), (False, 0.2), (True, 0.3), (True, 0.3)]


def test_sandwich_rotates_the_largest_and_smallest_subnets():
    n = 7
    largest, smallest = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for _ in range(30):  # every client sampled every round
        big, small = sandwich(np.arange(n), largest, smallest)
        assert len(big) == 1 and small not in big
        largest[big] += 1
        smallest[small] += 1
        assert largest.max() - largest.min() <= 1  # (the smallest's holder is chosen among the
        # clients that did not get the largest, so its counts may drift further)
    assert smallest.sum() == 30
    # two largest-subnet clients: the two that held it least, ties to the lowest id
    largest = np.array([3, 1, 1, 0, 2])
    assert sandwich(np.arange(5), largest, np.array([0, 0, 0, 5, 1]), n_largest=2) == ([3, 1], 0)
    assert sandwich(np.array([1, 4]), largest, np.zeros(5, np.int64), n_largest=2) == ([1, 4], None)


# --------------------------------------------------------------------------- elastic models


def mlp_space(hidden=(4, 3)):
    cfg = ModelConfig(name="elastic_mlp", hidden=list(hidden))
    return cfg, elastic_space(cfg, SuperFedConfig(widths=[0.5, 1.0]))


def resnet_space():
    cfg = ModelConfig(name="elastic_resnet", channels=[4, 8], blocks=[2, 1], norm="none")
    return cfg, elastic_space(cfg, SuperFedConfig(widths=[0.5, 1.0]))


def test_macs_and_params_by_hand():
    _, space = mlp_space()
    small = {"depth": 1, "widths": [2]}
    assert space.macs(small, (5,), 2) == 5 * 2 + 2 * 2
    assert space.params(small, (5,), 2) == (5 * 2 + 2) + (2 * 2 + 2)
    full = {"depth": 2, "widths": [4, 3]}
    assert space.macs(full, (5,), 2) == 5 * 4 + 4 * 3 + 3 * 2
    assert space.params(full, (5,), 2) == 24 + 15 + 8
    _, space = resnet_space()
    spec = {"depths": [1, 1], "widths": [[2], [4]]}
    # stem 4x1x9 at 8x8; block 1: 2x4x9 + 4x2x9 at 8x8; block 2 (stride 2, 4x4): 4x4x9 + 8x4x9 and
    # the 1x1 shortcut 8x4; classifier 8x3
    assert space.macs(spec, (1, 8, 8), 3) == 36 * 64 + 144 * 64 + (144 + 288 + 32) * 16 + 24
    assert space.params(spec, (1, 8, 8), 3) == 36 + 72 + 72 + 144 + 288 + 32 + 24 + 3
    for s in (spec, space.largest(), space.sample(np.random.default_rng(1))):  # the formulas vs the models
        model = space.build(s, (1, 8, 8), 3)
        assert count_macs(model, (1, 8, 8)) == space.macs(s, (1, 8, 8), 3)
        assert sum(p.numel() for p in model.parameters()) == space.params(s, (1, 8, 8), 3)


@pytest.mark.parametrize("which", ["mlp", "resnet"])
def test_extract_scatter_identity_and_standalone_forward(which):
    cfg, space = mlp_space((6, 5, 4)) if which == "mlp" else resnet_space()
    shape = (5,) if which == "mlp" else (1, 8, 8)
    torch.manual_seed(0)
    supernet = FlatModel(space.supernet(shape, 3))
    vec = supernet.get()
    rng = np.random.default_rng(0)
    for spec in [space.smallest(), space.largest(), *(space.sample(rng) for _ in range(5))]:
        sub = make_subnet(space, spec, supernet, shape, 3)
        assert np.unique(sub.index).size == sub.index.size == sub.params
        x = rng.normal(size=sub.params).astype(np.float32)
        np.testing.assert_array_equal(extract(scatter(vec, sub.index, x), sub.index), x)
        np.testing.assert_array_equal(scatter(vec, sub.index, extract(vec, sub.index)), vec)
        outside = np.setdiff1d(np.arange(vec.size), sub.index)
        np.testing.assert_array_equal(scatter(vec, sub.index, x)[outside], vec[outside])
    # the largest subnet's standalone model with extracted weights computes the supernet's function
    big = make_subnet(space, space.largest(), supernet, shape, 3)
    big.flat.set(extract(vec, big.index))
    xs = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(big.module(xs), supernet.module(xs))
    if which == "mlp":  # a narrow, shallow subnet is the supernet's leading blocks, by hand
        sub = make_subnet(space, {"depth": 2, "widths": [3, 2]}, supernet, shape, 3)
        sub.flat.set(extract(vec, sub.index))
        m = supernet.module
        h = torch.relu(xs @ m.hidden[0].weight[:3].T + m.hidden[0].bias[:3])
        h = torch.relu(h @ m.hidden[1].weight[:2, :3].T + m.hidden[1].bias[:2])
        with torch.no_grad():
            torch.testing.assert_close(sub.module(xs), h @ m.output.weight[:, :2].T + m.output.bias)


def test_prefix_index_refuses_a_model_that_does_not_fit():
    _, space = mlp_space((4, 3))
    supernet = FlatModel(space.supernet((5,), 2))
    wider = FlatModel(space.build({"depth": 1, "widths": [9]}, (5,), 2))
    with pytest.raises(ValueError, match="does not fit"):
        prefix_index(supernet, wider)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("medium", "expected smallest, largest or a JSON spec"),
        ('{"depth": 4, "widths": [1, 1, 1, 1]}', "depth must be an integer in [1, 3]"),
        ('{"depth": 1, "widths": [200]}', "widths[0] must be an integer in [1, 128]"),
        ('{"depth": 2, "widths": [8]}', "widths (one width per kept layer) must be a list of 2"),
        ('{"depth": 1, "width": [8]}', "keys depth and widths"),
        ("[1, 2]", "a subnet spec is a table/object"),
    ],
)
def test_bad_specs_are_user_errors(value, message):
    raw = {
        "algorithm": "fedavg",
        "model": {"name": "elastic_mlp", "hidden": [128, 128, 128], "subnet": value},
    }
    with pytest.raises(UserError, match="model.subnet") as err:
        validate(raw, "job.toml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_checks_and_subnet_resolution():
    def job(**kw):
        raw = {"algorithm": "superfed", "model": {"name": "elastic_mlp", "hidden": [64, 64]}, **kw}
        return validate(raw, "job.toml")

    with pytest.raises(UserError, match="needs model.name elastic_mlp or elastic_resnet"):
        validate({"algorithm": "superfed"}, "job.toml")
    with pytest.raises(UserError, match=r"superfed.depths: depths in \[1, 2\] including 2"):
        job(superfed={"depths": [1]})
    with pytest.raises(UserError, match="superfed.widths"):
        job(superfed={"widths": [0.5]})
    with pytest.raises(UserError, match=r"superfed.eval_subnets\[1\]"):
        job(superfed={"eval_subnets": ["smallest", '{"depth": 3, "widths": [1, 1, 1]}']})
    with pytest.raises(UserError, match=r"superfed.largest_clients: 2 clients x beta0 0.9 exceed"):
        job(superfed={"largest_clients": 2, "beta0": 0.9})
    with pytest.raises(
        UserError, match=r"superfed.largest_clients: 11 is more than clients_per_round \(10\)"
    ):
        job(superfed={"largest_clients": 11})
    with pytest.raises(UserError, match="model.subnet needs an elastic model.name"):
        validate({"algorithm": "fedavg", "model": {"subnet": "smallest"}}, "job.toml")
    with pytest.raises(UserError, match='model.norm: elastic_resnet takes "group" or "none"'):
        validate({"algorithm": "superfed", "model": {"name": "elastic_resnet", "norm": "batch"}}, "job.toml")
    # model.subnet: resolved to an explicit spec, which survives the resolved job's TOML
    raw = {"algorithm": "fedavg", "model": {"name": "elastic_mlp", "hidden": [64, 64], "subnet": "smallest"}}
    resolved = validate(raw, "job.toml")
    assert resolved.model.subnet == {"depth": 1, "widths": [16]}
    import tomllib

    assert validate(tomllib.loads(to_toml(resolved)), "config.toml").model.subnet == resolved.model.subnet


# --------------------------------------------------------------------------- runs


def tiny(tmp_path, *extra: str):
    return load_job(
        QUICKSTART,
        [
            f"out={tmp_path}",
            "algorithm=superfed",
            "model.name=elastic_mlp",
            "model.hidden=[16, 16]",
            "superfed.widths=[0.25, 0.5, 1.0]",
            "data.num_clients=6",
            *extra,
        ],
    )


def test_every_client_each_round_gets_the_largest_subnet_in_turn(tmp_path):
    job = tiny(tmp_path, "clients_per_round=6", "rounds=8", "eval_every=4", "checkpoint_every=8")
    run = run_in_process(job)
    largest, smallest = run.state["largest"], run.state["smallest"]
    assert largest.sum() == 8 and smallest.sum() == 8
    assert largest.max() - largest.min() <= 1
    with h5py.File(job.run_dir / "checkpoints" / "round_000008.h5", "r") as f:  # kept for resume
        np.testing.assert_array_equal(f["server/largest"][()], largest)
    with h5py.File(job.run_dir / "log.h5", "r") as f:
        family, metrics = f["family"], f["metrics"]
        specs = json.loads(family.attrs["subnets"])
        assert len(specs) == 4 and specs[0] == {"depth": 1, "widths": [4]}
        assert specs[-1] == {"depth": 2, "widths": [16, 16]}
        assert family["accuracy"].shape == (2, 4) and family["round"][()].tolist() == [3, 7]
        assert list(family.attrs["macs"]) == sorted(family.attrs["macs"])
        # test_accuracy is the largest subnet's
        assert metrics["test_accuracy"][7] == pytest.approx(family["accuracy"][1, -1], abs=1e-12)
        assert (metrics["bytes_down"][()] > 0).all() and (metrics["train_macs"][()] > 0).all()


def test_options_change_training_and_the_teacher_its_downlink(tmp_path):
    common = ("clients_per_round=3", "rounds=2", "eval_every=2")
    runs = {}
    for name, extra in {
        "paper": ("superfed.weighting=maxnet",),
        "samples": ("superfed.weighting=samples",),
        "cohort": ("superfed.weighting=maxnet", "superfed.average=cohort"),
        "largest": ("superfed.weighting=maxnet", "superfed.distill=0.5"),
        "subnet": ("superfed.weighting=maxnet", "superfed.distill=0.5", "superfed.teacher=subnet"),
    }.items():
        job = tiny(tmp_path, *common, f"name={name}", "superfed.beta0=0.9", *extra)
        runs[name] = (run_in_process(job), read_metrics(job.run_dir / "log.h5")[1])
    paper, log = runs["paper"]
    for name in ("samples", "cohort", "largest", "subnet"):  # each option changes the supernet
        assert np.abs(runs[name][0].state["model"] - paper.state["model"]).max() > 1e-4, name
    # the subnet teacher needs nothing more than the slices; the largest one the whole supernet
    np.testing.assert_array_equal(runs["subnet"][1]["bytes_down"], log["bytes_down"])
    assert (runs["largest"][1]["bytes_down"] >= 3 * 4 * paper.state["model"].size).all()
    assert (runs["subnet"][1]["train_macs"] > log["train_macs"]).all()  # + the teacher's forward pass


def test_log_family_rows_are_cut_on_resume_and_rebuilt_from_history(tmp_path):
    job = tiny(tmp_path, "clients_per_round=3", "rounds=4", "eval_every=1", "checkpoint_every=2")
    straight = run_in_process(job)
    with h5py.File(job.run_dir / "log.h5", "r") as f:
        want = {k: f["family"][k][()] for k in f["family"]}
        attrs = dict(f["family"].attrs)
    (job.run_dir / "checkpoints" / "round_000004.h5").unlink()  # as if killed after round 3
    again = run_in_process(job, resume=True)  # the log's rows of rounds 2, 3 are cut and redone
    np.testing.assert_array_equal(again.state["model"], straight.state["model"])
    with h5py.File(job.run_dir / "log.h5", "r") as f:
        for k, v in want.items():
            np.testing.assert_array_equal(f["family"][k][()], v)
    # an unreadable log is rebuilt from the checkpoint's history, family/ included
    (job.run_dir / "log.h5").write_bytes(b"not hdf5")
    shutil.copy(job.run_dir / "checkpoints" / "round_000004.h5", tmp_path / "keep.h5")
    for p in (job.run_dir / "checkpoints").glob("round_000004.h5"):
        p.unlink()
    with pytest.warns(UserWarning, match="rebuilt"):
        run_in_process(job, resume=True)
    with h5py.File(job.run_dir / "log.h5", "r") as f:
        assert f["family"].attrs["subnets"] == attrs["subnets"]
        for k, v in want.items():
            np.testing.assert_array_equal(f["family"][k][()], v)


def test_export_plot_and_fixed_subnet_baseline(tmp_path):
    job = tiny(tmp_path, "clients_per_round=3", "rounds=2", "eval_every=1")
    run = run_in_process(job)
    out = tmp_path / "small.h5"
    proc = hpcfed("export", job.run_dir, "--subnet", '{"depth": 2, "widths": [4, 8]}', "-o", out)
    assert proc.returncode == 0, proc.stderr
    from hpcfed.checkpoint import load_state_dict

    state = load_state_dict(out)
    with h5py.File(out, "r") as f:
        spec = json.loads(f.attrs["subnet"])
        assert (
            spec == {"depth": 2, "widths": [4, 8]}
            and f.attrs["params"] == 64 * 4 + 4 + 4 * 8 + 8 + 8 * 10 + 10
        )
    plain = build_model(ModelConfig(name="mlp", hidden=[4, 8]), (64,), 10)
    plain.load_state_dict(state, strict=True)  # the plain model of that shape
    space = elastic_space(job.model, job.superfed)
    sub = make_subnet(space, spec, FlatModel(build_model(job.model, (64,), 10)), (64,), 10)
    np.testing.assert_array_equal(FlatModel(plain).get(), run.state["model"][sub.index])
    # bad specs and runs: one line, exit 2
    for args in (["--subnet", "huge"], ["--subnet", '{"depth": 9, "widths": []}']):
        proc = hpcfed("export", job.run_dir, *args, "-o", tmp_path / "x.h5")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("hpcfed: error: --subnet"), proc.stderr
    proc = hpcfed("export", tmp_path / "nowhere", "--subnet", "smallest", "-o", tmp_path / "x.h5")
    assert proc.returncode == 2 and "config.toml" in proc.stderr
    # plot: the family's front is a panel of its own
    proc = hpcfed("plot", job.run_dir, "-o", tmp_path / "p.png")
    assert proc.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0, proc.stderr
    # model.subnet with FedAvg: the fixed subnet alone, starting from the supernet's initial weights
    base = job.model_copy(update={"name": "fixed"})
    fixed = load_job(QUICKSTART, [f"out={tmp_path}", "name=fixed", "model.name=elastic_mlp",
                                  "model.hidden=[16, 16]", "model.subnet=smallest", "rounds=1"])  # fmt: skip
    assert fixed.model.subnet == {"depth": 1, "widths": [4]}  # superfed.widths default: 0.25 of 16
    torch.manual_seed(fixed.seed)
    model = build_model(fixed.model, (64,), 10)
    torch.manual_seed(base.seed)
    supernet = build_model(base.model, (64,), 10)
    torch.testing.assert_close(model.hidden[0].weight, supernet.hidden[0].weight[:4])
    done = run_in_process(fixed)
    assert done.state["model"].size == 64 * 4 + 4 + 4 * 10 + 10
