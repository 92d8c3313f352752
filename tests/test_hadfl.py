"""HADFL (docs/hadfl.md): the pure maths, the three schedules in one process, config errors.

The MPI side (pairings identical on every rank, 1/2/3 ranks, resume) is tests/test_mpi_hadfl.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hpcfed.algorithms.hadfl import (
    cycle_time,
    device_lrs,
    inclusion_probabilities,
    local_steps,
    pair_average,
    pair_weights,
    pairing,
    select,
    selection_probabilities,
)
from hpcfed.checkpoint import list_checkpoints, load_checkpoint, load_state_dict
from hpcfed.cli import main
from hpcfed.config import load_job
from hpcfed.io.metrics import read_metrics
from hpcfed.models import build_model
from hpcfed.rng import numpy_generator, torch_generator
from hpcfed.train import LocalSGD

from .conftest import ROOT, run_in_process

JOB = ROOT / "jobs" / "hadfl_digits.toml"
SPEEDS = np.array([1, 1, 1, 1, 2, 2, 4, 8], dtype=np.float64)


def small(tmp_path, *overrides, name="h"):
    return load_job(
        JOB, [f"out={tmp_path}", f"name={name}", "rounds=4", "eval_every=2", "checkpoint_every=2", *overrides]
    )


# --------------------------------------------------------------------------- the maths


def test_local_steps_proportional_to_speed():
    tau = local_steps(SPEEDS, 16)
    assert tau.tolist() == [2, 2, 2, 2, 4, 4, 8, 16]
    np.testing.assert_allclose(tau / SPEEDS, 2.0)  # every device fills the same cycle
    # rounding (halves up) and the floor of one step for a very slow device
    assert local_steps(np.array([0.01, 3.0, 5.0, 10.0]), 10).tolist() == [1, 3, 5, 10]
    assert local_steps(np.array([1.0, 4.0]), 2).tolist() == [1, 2]  # 0.5 rounds up
    assert cycle_time("hadfl", SPEEDS, 16) == 2.0
    assert cycle_time("dfedavg", SPEEDS, 16) == cycle_time("sync", SPEEDS, 16) == 16.0
    assert cycle_time("hadfl", np.array([0.1, 10.0]), 10) == 10.0  # the floor: 1 step at 0.1/s


def test_selection_probabilities():
    p = selection_probabilities(np.array([2, 2, 4]), np.array([0, 3, 1]), "steps_staleness")
    np.testing.assert_allclose(p, np.array([2, 8, 8]) / 18)
    # capped at 1; the excess goes to the others in proportion
    pi = inclusion_probabilities(np.array([0.7, 0.1, 0.1, 0.1]), 2, np.zeros(4, bool))
    np.testing.assert_allclose(pi, [1.0, 1 / 3, 1 / 3, 1 / 3])
    pi = inclusion_probabilities(np.array([0.1, 0.3, 0.3, 0.3]), 2, np.array([True, False, False, False]))
    np.testing.assert_allclose(pi, [1.0, 1 / 3, 1 / 3, 1 / 3])


def _inclusion_counts(draw, draws: int, n: int) -> np.ndarray:
    counts = np.zeros(n)
    for i in range(draws):
        np.add.at(counts, draw(numpy_generator(7, "chi2", i)), 1)
    return counts


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_selection_frequencies_match_p_chi2(fraction):
    """Over 10^4 cycles device i is picked with frequency π_i = k·p_i (p_i ∝ τ_i(1+s_i)), capped
    at 1. The χ² test also has the power to reject the obvious alternative, numpy's weighted
    choice without replacement, whose inclusion frequencies are not proportional to p."""
    tau = local_steps(SPEEDS, 16)
    staleness = np.array([0, 1, 2, 0, 1, 0, 0, 0])
    p = selection_probabilities(tau, staleness, "steps_staleness")
    k = int(fraction * 8)
    pi = inclusion_probabilities(p, k, np.zeros(8, bool))
    if fraction == 0.25:
        np.testing.assert_allclose(pi, k * p)  # no cap reached: inclusion ∝ p exactly
    else:
        assert pi[7] == 1.0 and k * p[7] > 1  # the fast device is capped; the rest stay ∝ p
        np.testing.assert_allclose(pi[:7] / p[:7], pi[0] / p[0])
    draws = 10_000
    counts = _inclusion_counts(lambda g: select(g, tau, staleness, fraction, 99, "steps_staleness"), draws, 8)
    assert counts.sum() == draws * k
    _, pvalue = stats.chisquare(counts, draws * pi)
    assert pvalue > 1e-3, (counts, draws * pi)
    naive = _inclusion_counts(lambda g: g.choice(8, size=k, replace=False, p=p), draws, 8)
    assert stats.chisquare(naive, draws * pi)[1] < 1e-3


def test_forced_selection_past_max_staleness():
    tau = local_steps(SPEEDS, 16)
    staleness = np.array([5, 0, 0, 0, 0, 0, 0, 0])  # device 0: slow, overdue
    for i in range(200):
        chosen = select(numpy_generator(1, "t", i), tau, staleness, 0.25, 4, "steps_staleness")
        assert 0 in chosen and len(chosen) == 2
    # more devices overdue than k: all of them, and nobody else
    staleness = np.array([4, 9, 0, 6, 0, 0, 0, 0])
    assert select(numpy_generator(1, "t", 0), tau, staleness, 0.25, 4, "staleness").tolist() == [0, 1, 3]
    # below the bound nothing is forced: device 0 (lowest p) is left out most of the time
    staleness = np.array([3, 0, 0, 0, 0, 0, 0, 0])
    picked = sum(
        0 in select(numpy_generator(1, "u", i), tau, staleness, 0.25, 4, "steps_staleness")
        for i in range(200)
    )
    assert picked < 100


def test_pairing_is_a_partition_of_the_selected():
    selected = np.array([0, 2, 3, 5, 6, 7])
    pairs = pairing(numpy_generator(3, "hadfl", 0), selected)
    assert sorted(d for pair in pairs for d in pair) == selected.tolist()
    assert all(a < b for a, b in pairs)
    assert pairs == pairing(numpy_generator(3, "hadfl", 0), selected)  # same key, same pairs
    assert len(pairing(numpy_generator(3, "hadfl", 0), np.array([1, 4, 6]))) == 1  # odd one waits


def test_pair_average_equals_numpy_weighted_mean():
    g = np.random.default_rng(0)
    a, b = g.standard_normal(1000).astype(np.float32), g.standard_normal(1000).astype(np.float32)
    weights = [180.0 * 2, 220.0 * 16]  # data x steps
    got = pair_average([a, b], weights)
    want = np.average(np.stack([a, b]).astype(np.float64), axis=0, weights=weights)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-7)
    np.testing.assert_array_equal(pair_average([a, a], weights), a)


def test_selection_by_staleness_alone():
    tau, staleness = np.array([2, 2, 4]), np.array([0, 3, 1])
    np.testing.assert_allclose(selection_probabilities(tau, staleness, "staleness"), np.array([1, 4, 2]) / 7)
    # speed-blind: with no staleness the fast device is no likelier than a slow one
    np.testing.assert_allclose(
        selection_probabilities(local_steps(SPEEDS, 16), np.zeros(8), "staleness"), 1 / 8
    )


def test_pair_weights_by_hand():
    sizes, tau = np.array([10.0, 30.0]), np.array([2, 16])
    np.testing.assert_array_equal(pair_weights(sizes, tau, "data_steps"), [20.0, 480.0])
    np.testing.assert_array_equal(pair_weights(sizes, tau, "data"), [10.0, 30.0])
    # x_a = 1, x_b = 5: the data-weighted mean (10·1 + 30·5)/40 = 4 before the pair averages.
    # Both then hold the pair average: "data" keeps 4; data x steps gives (20·1 + 480·5)/500 = 4.84,
    # the mean moved 0.84 toward the fast device
    a, b = np.float32([1.0]), np.float32([5.0])
    for kind, mean in (("data", 4.0), ("data_steps", 4.84)):
        assert pair_average([a, b], pair_weights(sizes, tau, kind).tolist())[0] == pytest.approx(
            mean, rel=1e-6
        )


def test_device_lrs_by_hand():
    tau = np.array([2, 4, 16])
    np.testing.assert_allclose(device_lrs(0.1, tau, "same"), [0.1, 0.1, 0.1])
    np.testing.assert_allclose(device_lrs(0.1, tau, "per_cycle"), [0.1, 0.05, 0.0125])
    # every device's step budget per cycle, tau_i x lr_i, is the slowest one's
    np.testing.assert_allclose(tau * device_lrs(0.1, tau, "per_cycle"), 0.2)


# --------------------------------------------------------------------------- runs in one process


def test_hadfl_run_bytes_clock_checkpoint(tmp_path):
    job = small(tmp_path, "rounds=6", "checkpoint_every=3", "hadfl.max_staleness=2")
    run = run_in_process(job)
    _, m = read_metrics(job.run_dir / "log.h5")
    p = run.flat.size
    assert m["round"].tolist() == list(range(6))
    np.testing.assert_allclose(m["sim_time"], 2.0 * np.arange(1, 7))  # 16 steps at speed 8
    assert (m["bytes_up"] == 4 * 4 * p).all()  # 4 devices pair up, each sends its float32 model
    assert (m["bytes_down"] == 0).all()
    assert run.state["staleness"].max() <= 2 + 1
    # the checkpoint: model/ is the data-weighted average of the device models in clients/
    ckpt = load_checkpoint(list_checkpoints(job.run_dir)[0])
    devices = np.stack([ckpt.groups["clients"][f"device.{d}"] for d in range(8)]).astype(np.float64)
    sizes = run.data.client_sizes.astype(np.float64)
    average = (sizes @ devices / sizes.sum()).astype(np.float32)
    np.testing.assert_allclose(run.state["model"], average, rtol=1e-6, atol=1e-7)
    model = build_model(job.model, run.data.input_shape, run.data.num_classes)
    model.load_state_dict(load_state_dict(ckpt.path), strict=True)
    assert ckpt.groups["server"]["sim_time"][0] == 12.0
    assert not all(np.array_equal(devices[0], devices[d]) for d in range(1, 8))  # gossip, no consensus


def test_dfedavg_and_sync(tmp_path):
    for schedule in ("dfedavg", "sync"):
        job = small(tmp_path, f"hadfl.schedule={schedule}", "rounds=2", "hadfl.local_steps=3", name=schedule)
        run = run_in_process(job)
        models = list(run.strategy.models.values())
        assert all(np.array_equal(models[0], x) for x in models)  # full averages: consensus
        _, m = read_metrics(job.run_dir / "log.h5")
        np.testing.assert_allclose(m["sim_time"], [3.0, 6.0])  # 3 steps at the slowest pace, 1/s
        ring = 2 * 7 * 4 * run.flat.size
        assert (m["bytes_up"] == (ring if schedule == "dfedavg" else 3 * ring)).all()


def test_sync_step_equals_averaged_gradient_step(tmp_path):
    """One sync step = one SGD step on the data-weighted mean of the devices' minibatch gradients."""
    job = small(tmp_path, "hadfl.schedule=sync", "rounds=1", "hadfl.local_steps=1", "train.weight_decay=0.01")
    run = run_in_process(job)
    torch.manual_seed(job.seed)
    ref = build_model(job.model, run.data.input_shape, run.data.num_classes)
    grads = [torch.zeros_like(q) for q in ref.parameters()]
    sizes = run.data.client_sizes.astype(np.float64)
    for d in range(8):
        x, y = run.data.client(d)
        order = torch.randperm(len(y), generator=torch_generator(job.seed, "train", 0, d, 0))
        idx = order[: job.train.batch_size]
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        for g, q in zip(grads, ref.parameters()):
            g += float(sizes[d] / sizes.sum()) * q.grad
    with torch.no_grad():
        for g, q in zip(grads, ref.parameters()):
            q -= job.train.lr * (g + job.train.weight_decay * q)
    want = torch.cat([q.detach().flatten() for q in ref.parameters()]).numpy()
    np.testing.assert_allclose(run.state["model"], want, atol=2e-6)


def test_selection_key_reaches_the_run(tmp_path):
    """The run's staleness after 3 cycles is what replaying select() with its key gives, and the
    two keys pick differently (the paper's reading pairs the fast device 7 every cycle)."""
    tau, after = local_steps(SPEEDS, 16), {}
    for by in ("staleness", "steps_staleness"):
        run = run_in_process(small(tmp_path, "rounds=3", f"hadfl.selection={by}", name=by))
        staleness = np.zeros(8, dtype=np.int64)
        for rnd in range(3):
            rng = numpy_generator(run.job.seed, "hadfl", rnd)
            synced = [d for pair in pairing(rng, select(rng, tau, staleness, 0.5, 4, by)) for d in pair]
            staleness = np.where(np.isin(np.arange(8), synced), 0, staleness + 1)
        np.testing.assert_array_equal(run.state["staleness"], staleness)
        after[by] = staleness
    assert after["steps_staleness"][7] == 0 and not np.array_equal(
        after["staleness"], after["steps_staleness"]
    )


def test_full_average_cycle_is_the_data_weighted_mean(tmp_path):
    """full_average_every = 2: cycle 2 ends in the data-weighted mean of all device models (what
    the pair averages of the same cycle, weighted by data, leave as the devices' mean), every
    device holds it, nobody is stale, and the cycle is charged a ring all-reduce."""
    opts = ["rounds=2", "hadfl.pair_weight=data"]
    full = run_in_process(small(tmp_path, *opts, "hadfl.full_average_every=2", name="full"))
    pairs = run_in_process(small(tmp_path, *opts, name="pairs"))
    models = list(full.strategy.models.values())
    assert all(np.array_equal(models[0], x) for x in models)
    np.testing.assert_allclose(models[0], pairs.state["model"], rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(x, pairs.state["model"]) for x in pairs.strategy.models.values())
    assert (full.state["staleness"] == 0).all()
    _, m = read_metrics(full.run_dir / "log.h5")
    p = full.flat.size
    assert m["bytes_up"].tolist() == [4 * 4 * p, 2 * 7 * 4 * p]  # a pair cycle, then the full one
    np.testing.assert_allclose(m["sim_time"], [2.0, 4.0])  # communication is not on the clock
    # with data x steps pair weights the same cycle would have moved the mean elsewhere
    skewed = run_in_process(small(tmp_path, "rounds=2", "hadfl.pair_weight=data_steps", name="skewed"))
    assert np.abs(skewed.state["model"] - models[0]).max() > 1e-4


def test_per_cycle_lr_reaches_each_device(tmp_path):
    """lr_scale = per_cycle: with speeds 1, 2 (tau 1, 2) the fast device trains at lr/2. Two
    devices always pair; with data weights the pair's model is the data-weighted mean of one step
    at lr and two at lr/2 from the initial model, trained here by hand."""
    opts = [
        "rounds=1",
        "data.num_clients=2",
        "hadfl.speeds=[1, 2]",
        "hadfl.local_steps=2",
        "hadfl.pair_weight=data",
    ]
    run = run_in_process(small(tmp_path, *opts, "hadfl.lr_scale=per_cycle", name="per"))
    job = run.job
    torch.manual_seed(job.seed)
    ref = build_model(job.model, run.data.input_shape, run.data.num_classes)
    init = [q.detach().clone() for q in ref.parameters()]
    trained = []
    for d, (steps, lr) in enumerate(((1, job.train.lr), (2, job.train.lr / 2))):
        with torch.no_grad():
            for q, q0 in zip(ref.parameters(), init):
                q.copy_(q0)
        trainer = LocalSGD(ref, job.train.model_copy(update={"lr": lr}))
        x, y = run.data.client(d)
        trainer.train_steps(x, y, torch_generator(job.seed, "train", 0, d), steps)
        trained.append(torch.cat([q.detach().flatten() for q in ref.parameters()]).numpy())
    want = pair_average(trained, run.data.client_sizes.astype(np.float64).tolist())
    np.testing.assert_allclose(run.strategy.models[1], want, atol=1e-6)
    same = run_in_process(small(tmp_path, *opts, "hadfl.lr_scale=same", name="same"))
    assert np.abs(same.strategy.models[1] - want).max() > 1e-4


def test_measured_speeds_are_kept_in_the_checkpoint(tmp_path):
    job = small(tmp_path, 'hadfl.speeds="measured"', "rounds=2")
    run = run_in_process(job)
    speeds = run.state["speeds"]
    assert speeds.shape == (8,) and (speeds > 0).all()
    ckpt = load_checkpoint(list_checkpoints(job.run_dir)[0])
    np.testing.assert_array_equal(ckpt.groups["server"]["speeds"], speeds)
    resumed = run_in_process(job.model_copy(update={"rounds": 3}), resume=True)
    np.testing.assert_array_equal(resumed.state["speeds"], speeds)  # not re-measured


def test_stop_request_checkpoints_at_the_cycle_boundary(tmp_path):
    from hpcfed.comm import world
    from hpcfed.runner import Run
    from hpcfed.signals import StopFlag

    job = small(tmp_path, "rounds=10", "checkpoint_every=100")
    stop = StopFlag()
    stop.received = "SIGTERM"  # as if the signal arrived during the first cycle
    run = Run(job, world(), job.run_dir, progress=False, stop=stop)
    run.create_files()
    result = run.loop()
    assert (result.rounds_done, result.stopped_by) == (1, "SIGTERM")
    assert [p.name for p in list_checkpoints(job.run_dir)] == ["round_000001.h5"]


def test_plot_draws_accuracy_against_sim_time(tmp_path):
    from hpcfed.io.plots import plot_runs

    from .test_plots import assert_png, png_width

    a = run_in_process(small(tmp_path, name="a")).run_dir
    b = run_in_process(small(tmp_path, "hadfl.schedule=dfedavg", name="b")).run_dir
    png = assert_png(plot_runs([a, b], tmp_path / "p.png"))
    assert png_width(png) == round(3 * 4.8 * 120)  # round, bytes and sim_time panels


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, needles",
    [
        ('hadfl.speeds="lognormal:x"', ["hadfl.speeds", "lognormal:SIGMA"]),
        ("hadfl.speeds=[]", ["hadfl.speeds", "non-empty"]),
        ("hadfl.speeds=[1, -2]", ["hadfl.speeds", "positive"]),
        ('hadfl.speeds="fast"', ["hadfl.speeds"]),
        ("hadfl.schedule=ring", ["hadfl.schedule"]),
        ("hadfl.select_fraction=0", ["hadfl.select_fraction"]),
        ("hadfl.local_steps=0", ["hadfl.local_steps"]),
        (["hadfl.schedule=sync", "train.momentum=0.9"], ["hadfl.schedule 'sync'", "train.momentum"]),
        ("data.num_clients=1", ["data.num_clients", "at least 2"]),
        ("compress.sparsity=0.9", ["[compress]", "hadfl"]),
        ("hadfl.pair_weight=steps", ["hadfl.pair_weight"]),
        ("hadfl.selection=speed", ["hadfl.selection"]),
        ("hadfl.lr_scale=adaptive", ["hadfl.lr_scale"]),
        ("hadfl.full_average_every=-1", ["hadfl.full_average_every"]),
    ],
)
def test_config_errors_exit_2_one_line(tmp_path, capsys, override, needles):
    overrides = override if isinstance(override, list) else [override]
    code = main(["run", str(JOB), f"out={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("hpcfed: error:"), err
    assert all(n in err[0] for n in needles), err[0]
