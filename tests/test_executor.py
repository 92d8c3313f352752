"""The vectorised client executor (#18): FusedMLP against the sequential loop it replaces.

Per client, a group trained at once must equal one-at-a-time training (hpcfed.train.LocalSGD) to
float rounding, whatever the sizes (empty, one sample, partial last batches), epochs, momentum,
weight decay, stragglers' step limits, corrections and frozen layers; a client's result must not
depend on which clients share its group; whole runs with parallel_clients "auto" and 1 agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcfed.config import TrainConfig, load_job
from hpcfed.executor import FusedMLP, group_size, linear_stack
from hpcfed.flat import FlatModel
from hpcfed.models.mlp import MLP
from hpcfed.rng import torch_generator
from hpcfed.train import GradientCorrection, LocalSGD

from .conftest import QUICKSTART, run_in_process

SIZES = [0, 1, 7, 10, 11, 23, 40]


def _clients(sizes, d=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        out.append((torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g), i))
    return out


def _model(hidden=(16, 8), d=12, classes=5):
    torch.manual_seed(0)
    return FlatModel(MLP((d,), list(hidden), classes))


def _sequential(flat, cfg, clients, limits, correction_args=None, params=None):
    trainer = LocalSGD(flat.module, cfg, params)
    start = flat.vector.detach().clone()
    out = []
    for (x, y, i), limit in zip(clients, limits):
        flat.set(start)
        correction = None
        if correction_args:
            correction = GradientCorrection.for_model(flat, trainer.opt.params, **correction_args)
        gen = torch_generator(0, "train", 0, i)
        if limit is None:
            loss, steps = trainer.train(x, y, gen, correction=correction)
        else:
            from hpcfed.train import local_work

            planned = cfg.epochs * -(-x.shape[0] // cfg.batch_size)
            with local_work(limit / planned if planned else 1.0):
                loss, steps = trainer.train(x, y, gen, correction=correction)
        out.append((flat.vector.detach().clone(), loss, steps))
    flat.set(start)
    return out


def _fused(flat, cfg, clients, limits, correction_args=None, params=None):
    trainer = LocalSGD(flat.module, cfg, params)
    fused = FusedMLP.build(flat, trainer)
    correction = None
    if correction_args:
        correction = GradientCorrection.for_model(flat, trainer.opt.params, **correction_args)
    group = [(x, y, torch_generator(0, "train", 0, i), limit) for (x, y, i), limit in zip(clients, limits)]
    return fused.train(flat.vector.detach().clone(), group, correction)


@pytest.mark.parametrize(
    "keys",
    [
        dict(),
        dict(epochs=3),
        dict(momentum=0.9, weight_decay=1e-3, epochs=2),
        dict(batch_size=4, lr=0.2),
    ],
    ids=["plain", "epochs", "momentum-wd", "batch4"],
)
def test_group_equals_one_at_a_time(keys):
    cfg = TrainConfig(**keys)
    flat = _model()
    clients = _clients(SIZES)
    limits = [None] * len(clients)
    want = _sequential(flat, cfg, clients, limits)
    got = _fused(flat, cfg, clients, limits)
    start = flat.vector.detach()
    for (vec, loss, steps), r in zip(want, got):
        assert r.steps == steps
        delta, fused_delta = vec - start, r.vector - start
        scale = max(float(delta.abs().max()), 1e-12)
        assert float((delta - fused_delta).abs().max()) <= 1e-5 * scale + 1e-7
        assert r.loss == pytest.approx(loss, rel=1e-5, abs=1e-7)


def test_stragglers_corrections_and_frozen_layers():
    cfg = TrainConfig(epochs=2, momentum=0.5)
    flat = _model()
    clients = _clients(SIZES)
    limits = [None, 1, 1, 2, None, 3, 5]  # a straggler's share of steps, as [faults] gives it
    anchor = flat.get() + 0.1
    offset = np.linspace(-0.01, 0.01, flat.size).astype(np.float32)
    frozen = [p for n, p in flat.module.named_parameters() if not n.startswith("hidden.0")]
    corr = dict(prox_mu=0.3, anchor=anchor, offset=offset)
    want = _sequential(flat, cfg, clients, limits, corr, params=frozen)
    got = _fused(flat, cfg, clients, limits, corr, params=frozen)
    first = flat.slice_of("hidden.0.weight")
    for (vec, _, steps), r in zip(want, got):
        assert r.steps == steps
        torch.testing.assert_close(r.vector, vec, rtol=1e-5, atol=1e-6)
        assert torch.equal(r.vector[first], flat.vector[first])  # the frozen layer never moved


def test_client_result_and_its_group():
    """Within rounding of its group's composition (the padded batch width changes how BLAS
    blocks a product), which is why groups are cut from the cohort alone and placed whole."""
    cfg = TrainConfig(momentum=0.9)
    flat = _model()
    clients = _clients(SIZES)
    together = _fused(flat, cfg, clients, [None] * len(clients))
    again = _fused(flat, cfg, clients, [None] * len(clients))
    for j in (1, 4, 6):
        assert torch.equal(again[j].vector, together[j].vector)  # the same group: bit for bit
        alone = _fused(flat, cfg, [clients[j]], [None])[0]
        torch.testing.assert_close(alone.vector, together[j].vector, rtol=1e-6, atol=1e-7)


def test_where_it_applies():
    from torch import nn

    assert linear_stack(MLP((4,), [8], 3)) is not None
    assert linear_stack(MLP((4,), [], 3)) is not None  # logistic regression
    assert linear_stack(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))) is not None
    assert linear_stack(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 3))) is None
    assert linear_stack(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))) is None
    from hpcfed.models.cnn import build_cnn

    assert linear_stack(build_cnn((1, 28, 28), 10)) is None
    wide = FlatModel(MLP((4,), [4096], 3))
    assert group_size("auto", FusedMLP.build(wide, LocalSGD(wide.module, TrainConfig()))) == 1
    assert group_size("auto", None) == 1 and group_size(7, None) == 1


# --------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.momentum=0.9", "train.epochs=2"],
        ["algorithm=fedprox", "fedprox.mu=0.5"],
        ["algorithm=fedpt", 'fedpt.freeze=["hidden.0.*"]'],
        ["dp.clip=0.5", "dp.noise_multiplier=0.5"],
        ["compress.sparsity=0.9", "compress.quantization=uniform"],
        ["faults.slow_prob=0.5", "faults.drop_prob=0.2", "faults.nan_prob=0.1"],
        ["algorithm=fednova", "faults.slow_prob=0.5"],
    ],
    ids=["fedavg", "momentum", "fedprox", "fedpt", "dp", "compress", "faults", "fednova"],
)
def test_auto_and_one_at_a_time_give_the_same_run(tmp_path, overrides):
    keys = [f"out={tmp_path}", "rounds=4", "eval_every=2", "data.num_clients=20", "clients_per_round=8"]
    auto = run_in_process(load_job(QUICKSTART, [*keys, "name=auto", *overrides]))
    one = run_in_process(load_job(QUICKSTART, [*keys, "name=one", "train.parallel_clients=1", *overrides]))
    assert auto.group_size > 1 and one.group_size == 1
    a, b = auto.state["model"], one.state["model"]
    if any(o.startswith("compress.") for o in overrides):
        # top-k and quantisation are discontinuous: a rounding-level difference can keep another
        # entry or pick another level, so the runs agree closely, not element by element
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert abs(auto.result.test_accuracy - one.result.test_accuracy) <= 0.01


def test_parallel_clients_key_is_checked():
    from hpcfed.config import UserError

    with pytest.raises(UserError, match="train.parallel_clients"):
        load_job(QUICKSTART, ["train.parallel_clients=0"])
    assert load_job(QUICKSTART, ["train.parallel_clients=16"]).train.parallel_clients == 16


def test_group_sum_leaves_out_a_diverged_client(tmp_path, monkeypatch):
    """A client whose trained model is not finite is left out of the group's sum and counted in
    rejected_updates, as the engine does with one client's update (FedAvg.group_update looks at
    the rows only when the sum is not finite)."""
    from hpcfed.comm import world
    from hpcfed.executor import GroupRun
    from hpcfed.runner import Run

    job = load_job(QUICKSTART, [f"out={tmp_path}", "rounds=1", "data.num_clients=20", "clients_per_round=8"])
    run = Run(job, world(), job.run_dir, progress=False)
    strategy, clients = run.strategy, [1, 4, 6, 9]
    sick = clients[2]

    def group_sum():
        strategy.group = GroupRun(run.fused, clients, {})
        strategy.begin_round(run.state, 0)
        update = strategy.group_update(run.state, clients, 0)
        stack, rows = strategy.group.stack, strategy.group.stack_clients
        return update, (stack[rows.index(sick)] - torch.from_numpy(strategy._received)).double()

    clean, delta = group_sum()
    train = FusedMLP.train

    def diverging(self, start, group, correction=None):
        results = train(self, start, group, correction)
        ends, order = self.last_stack
        ends[order.index(clients.index(sick))] = float("nan")  # that client's model (a row of the stack)
        return results

    monkeypatch.setattr(FusedMLP, "train", diverging)
    poisoned, _ = group_sum()
    n = float(run.data.client(sick)[1].shape[0])
    assert poisoned.metrics["rejected_updates"] == 1 and clean.metrics["rejected_updates"] == 0
    assert poisoned.weight == clean.weight - n and poisoned.metrics["samples"] == clean.metrics["samples"] - n
    np.testing.assert_allclose(poisoned.value, clean.value - n * delta.numpy(), rtol=1e-9, atol=1e-9)
    assert np.isfinite(poisoned.metrics["loss_sum"])
