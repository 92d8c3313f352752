"""The baselines (#16): FedProx, SCAFFOLD, FedNova, FedAdagrad, FedYogi.

Hand-computed update rules on tiny cases, the equalities that pin each to FedAvg (FedProx mu = 0
bit for bit, FedNova with equal steps to 1e-6), exact resume (SCAFFOLD's control variates
included) and the combinations refused at start-up. 1 vs 2 vs 3 ranks: tests/test_mpi_baselines.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcfed.algorithms.base import Update, strategy_class
from hpcfed.algorithms.fednova import normaliser
from hpcfed.config import UserError, load_job
from hpcfed.flat import FlatModel
from hpcfed.train import GradientCorrection

from .conftest import QUICKSTART, assert_resume_matches, run_in_process


class SelfComm:
    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0


def _strategy(algorithm: str, overrides=(), weights=(1.0, 1.0)):
    """A strategy over a two-weight linear model (no data needed for server-side maths)."""
    keys = ["data.num_clients=10", "clients_per_round=2", f"algorithm={algorithm}", *overrides]
    job = load_job(QUICKSTART, keys)
    flat = FlatModel(torch.nn.Linear(2, 1, bias=False))
    flat.set(np.array(weights))
    return strategy_class(algorithm)(job, flat, None, torch.device("cpu"), SelfComm())


def _job(tmp_path, name, overrides=(), rounds=6):
    return load_job(
        QUICKSTART,
        [f"out={tmp_path}", f"name={name}", f"rounds={rounds}", "eval_every=2", "checkpoint_every=3",
         "data.num_clients=12", "clients_per_round=4", *overrides],
    )  # fmt: skip


# --------------------------------------------------------------------------- hand-computed rules


def test_fedadagrad_and_fedyogi_second_moments():
    # one round, average delta [0.1, -0.2] (one client of weight 1); beta1 0.9, beta2 0.99, tau 1e-3
    delta = np.array([0.1, -0.2])
    total = Update(value=delta.copy(), weight=1.0)
    m = 0.1 * delta  # (1 - beta1) * delta
    # Adagrad: v = tau^2 + delta^2 = [0.010001, 0.040001]
    s = _strategy("fedavg", ["fedavg.server_optimizer=adagrad"])
    state = s.server_update(s.init_state(), total, 0)
    np.testing.assert_allclose(state["adapt_v"], [0.010001, 0.040001])
    np.testing.assert_allclose(state["adapt_m"], m)
    expected = 1.0 + m / (np.sqrt([0.010001, 0.040001]) + 1e-3)
    np.testing.assert_allclose(state["model"], expected.astype(np.float32))
    # Yogi: v = tau^2 - 0.01 * delta^2 * sign(tau^2 - delta^2) = tau^2 + 0.01 delta^2 = [1.01e-4, 4.01e-4]
    s = _strategy("fedavg", ["fedavg.server_optimizer=yogi"])
    state = s.server_update(s.init_state(), total, 0)
    np.testing.assert_allclose(state["adapt_v"], [1.01e-4, 4.01e-4])
    # a second round with a small delta: Yogi's v shrinks by at most (1 - beta2) delta^2
    small = Update(value=np.array([0.001, 0.001]), weight=1.0)
    v1 = state["adapt_v"].copy()
    state = s.server_update(state, small, 1)
    np.testing.assert_allclose(state["adapt_v"], v1 - 0.01 * 1e-6)


def test_fednova_normalised_step():
    # client A: n=10, tau=2, delta [1, 1]; client B: n=30, tau=6, delta [3, 0]
    # sums: n d = 10[1,1]/2 + 30[3,0]/6 = [20, 5]; n = 40; n a = 20 + 180 = 200 -> tau_eff = 5
    s = _strategy("fednova")
    total = Update(value=np.array([20.0, 5.0]), weight=40.0, extras={"a_weighted": np.array([200.0])})
    np.testing.assert_allclose(s.aggregate(total, 0), [2.5, 0.625])  # FedAvg: [2.5, 0.25]
    assert normaliser(6, 0.0) == 6.0
    # momentum 0.5, two steps: the first gradient is applied with weight 1 + 0.5, the second 1
    assert normaliser(2, 0.5) == pytest.approx(2.5)


def test_gradient_correction_is_affine():
    lin = torch.nn.Linear(2, 1, bias=False)
    flat = FlatModel(lin)
    flat.set(np.array([1.0, 2.0]))
    lin.weight.grad = torch.zeros_like(lin.weight)
    corr = GradientCorrection.for_model(
        flat, [lin.weight], prox_mu=0.5, anchor=[0.0, 0.0], offset=[1.0, -1.0]
    )
    corr.apply()
    # g + mu (w - anchor) + offset = 0 + 0.5 [1, 2] + [1, -1]
    np.testing.assert_allclose(lin.weight.grad.numpy().ravel(), [1.5, 0.0])


def test_scaffold_server_step_and_control_average():
    # two clients: dy [1, 0] and [0, 2] -> mean [0.5, 1]; dc sums [1, 1] -> c += [1, 1] / N (N = 10)
    s = _strategy("scaffold", ["scaffold.server_lr=0.5"])
    state = s.init_state()
    total = Update(value=np.array([1.0, 2.0]), weight=2.0, extras={"control": np.array([1.0, 1.0])})
    state = s.server_update(state, total, 0)
    np.testing.assert_allclose(state["model"], [1.0 + 0.25, 1.0 + 0.5])
    np.testing.assert_allclose(state["control"], [0.1, 0.1])


def zero_loss(outputs, targets):
    """A loss with zero gradient: local steps move only by the control-variate correction."""
    return 0.0 * outputs.sum()


def test_scaffold_control_variate_update_hand_computed(tmp_path):
    """With zero gradients, K plain SGD steps move y = x - K lr (c - c_i); option II then gives
    c_i+ = c_i - c + (x - y)/(K lr) = 0, the true (zero) gradient; option I gives it directly."""
    for option in ("II", "I"):
        job = _job(tmp_path, f"zero{option}", ["algorithm=scaffold", f"scaffold.control_update={option}",
                                              "train.loss=tests.test_baselines:zero_loss"])  # fmt: skip
        from hpcfed.comm import world
        from hpcfed.runner import Run

        run = Run(job, world(), job.run_dir, progress=False)
        strategy, state = run.strategy, run.strategy.init_state()
        state["control"][:] = 0.5  # c = 0.5, c_i = 0
        strategy.begin_round(state, 0)
        update = strategy.client_update(state, 3, 0)
        steps = 1 * int(np.ceil(run.data.client_sizes[3] / job.train.batch_size))
        np.testing.assert_allclose(update.value, -steps * job.train.lr * 0.5, rtol=1e-5)  # dy
        np.testing.assert_allclose(strategy.store.get(3)["c"], 0.0, atol=1e-5)  # c_i+ = 0
        np.testing.assert_allclose(update.extras["control"], 0.0, atol=1e-5)  # dc = c_i+ - c_i
        p = run.flat.size
        message = 4 * p + 25  # a float32 vector behind the 25-byte header, twice each way
        assert update.metrics["bytes_up"] == 2 * message and update.metrics["bytes_down"] == 2 * message


def test_scaffold_option_one_is_the_full_gradient(tmp_path):
    job = _job(tmp_path, "opt1", ["algorithm=scaffold", "scaffold.control_update=I"])
    from hpcfed.comm import world
    from hpcfed.runner import Run

    run = Run(job, world(), job.run_dir, progress=False)
    x = run.flat.get()
    got = run.strategy.full_gradient(x, 2)
    run.flat.set(x)
    xs, ys = run.data.client(2)
    run.flat.module.zero_grad()
    torch.nn.functional.cross_entropy(run.flat.module(xs), ys).backward()
    want = np.concatenate([p.grad.numpy().ravel() for p in run.flat.module.parameters()])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- equal to FedAvg


def test_fedprox_mu_zero_is_fedavg_bit_for_bit(tmp_path):
    a = run_in_process(_job(tmp_path, "prox0", ["algorithm=fedprox", "fedprox.mu=0"]))
    b = run_in_process(_job(tmp_path, "avg"))
    np.testing.assert_array_equal(a.state["model"], b.state["model"])
    c = run_in_process(_job(tmp_path, "prox1", ["algorithm=fedprox", "fedprox.mu=1.0"]))
    assert not np.array_equal(c.state["model"], b.state["model"])
    # the proximal term pulls each client towards the global model: smaller client moves
    assert np.linalg.norm(c.state["model"] - b.state["model"]) > 0


def test_fednova_equal_steps_is_fedavg(tmp_path):
    # iid over 3 clients of 479 samples each (1,437 digits): every client takes 48 steps
    keys = ["data.partition=iid", "data.num_clients=3", "clients_per_round=3", "train.momentum=0.5"]
    a = run_in_process(_job(tmp_path, "nova", ["algorithm=fednova", *keys]))
    b = run_in_process(_job(tmp_path, "avg", keys))
    np.testing.assert_allclose(a.state["model"], b.state["model"], atol=1e-6, rtol=0)


def test_fednova_differs_when_steps_differ(tmp_path):
    keys = ["data.partition=dirichlet", "train.epochs=2"]
    a = run_in_process(_job(tmp_path, "nova", ["algorithm=fednova", *keys]))
    b = run_in_process(_job(tmp_path, "avg", keys))
    assert np.abs(a.state["model"] - b.state["model"]).max() > 1e-3


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=fedprox", "fedprox.mu=0.5", "faults.slow_prob=0.5"],
        ["algorithm=scaffold"],
        ["algorithm=scaffold", "scaffold.state=disk", "scaffold.control_update=I"],
        ["algorithm=fednova", "train.momentum=0.9", "faults.slow_prob=0.5"],
        ["fedavg.server_optimizer=adagrad", "fedavg.server_lr=0.05"],
        ["fedavg.server_optimizer=yogi", "fedavg.server_lr=0.05"],
    ],
    ids=["fedprox", "scaffold", "scaffold-disk-I", "fednova", "fedadagrad", "fedyogi"],
)
def test_resume_equals_uninterrupted(tmp_path, overrides):
    straight = run_in_process(_job(tmp_path, "straight", overrides))
    run_in_process(_job(tmp_path, "parts", overrides, rounds=3))
    resumed = run_in_process(_job(tmp_path, "parts", overrides), resume=True)
    assert_resume_matches(straight, resumed, tmp_path, ("train_loss", "bytes_up", "bytes_down"))
    if "algorithm=scaffold" in overrides:
        assert np.abs(straight.state["control"]).max() > 0  # the control variate moved and resumed


# --------------------------------------------------------------------------- refused combinations


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["algorithm=scaffold", "compress.sparsity=0.9"], "[compress] does not apply to algorithm"),
        (["algorithm=scaffold", "dp.clip=1.0"], "[dp] works with"),
        (["algorithm=scaffold", "robust.clip_norm=1.0"], "[robust] works with"),
        (["algorithm=fednova", "dp.clip=1.0"], "not algorithm 'fednova'"),
        (["algorithm=fednova", "robust.aggregate=median"], "not algorithm 'fednova'"),
        (["algorithm=fedprox", "fedprox.mu=-1"], "fedprox.mu"),
        (["algorithm=scaffold", "scaffold.control_update=III"], "scaffold.control_update"),
    ],
)
def test_refused_combinations_name_the_key(overrides, needle):
    with pytest.raises(UserError) as exc:
        load_job(QUICKSTART, overrides)
    assert needle in str(exc.value)


def test_fedprox_takes_dp_and_robust():
    assert load_job(QUICKSTART, ["algorithm=fedprox", "dp.clip=1.0"]).dp is not None
    assert load_job(QUICKSTART, ["algorithm=fedprox", "robust.clip_norm=1.0"]).robust.active
