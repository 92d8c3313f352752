"""FedPT: what is frozen, that it stays frozen and unsent, message sizes, and FedPT == FedAvg when
nothing is frozen. The 1-vs-N-ranks checks are in test_mpi_fedpt.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcfed.algorithms.fedpt import HEAD_LR_SCALE, is_head, largest_layer, lr_scale, select_trainable
from hpcfed.codecs import IdentityCodec
from hpcfed.comm import world
from hpcfed.config import FedPTConfig, ModelConfig, UserError, load_job
from hpcfed.flat import FlatModel
from hpcfed.io.metrics import read_metrics
from hpcfed.models import build_model
from hpcfed.models.cnn import build_cnn
from hpcfed.rng import cohort
from hpcfed.runner import Run

from .conftest import QUICKSTART, assert_resume_matches, run_in_process

SMALL = ["data.num_clients=20", "clients_per_round=5", "eval_every=2", "checkpoint_every=100"]
LARGEST = ["algorithm=fedpt", 'fedpt.freeze="largest"']


def _run(tmp_path, name, overrides, rounds=3):
    job = load_job(QUICKSTART, [f"out={tmp_path}", f"name={name}", f"rounds={rounds}", *SMALL, *overrides])
    run = Run(job, world(), job.run_dir, progress=False)
    initial = run.state["model"].copy()
    run.create_files()
    run.loop()
    return run, initial


def _frozen(run) -> np.ndarray:
    mask = np.ones(run.flat.size, dtype=bool)
    mask[run.strategy.index] = False
    return mask


# --------------------------------------------------------------------------- what is frozen


def test_largest_is_the_mlp_hidden_layer_and_the_cnn_dense_128():
    torch.manual_seed(0)
    mlp = FlatModel(build_model(ModelConfig(), (64,), 10))
    assert largest_layer(mlp) == "hidden.0"
    assert select_trainable(mlp, FedPTConfig(freeze="largest")) == ["output.weight", "output.bias"]

    cnn = FlatModel(build_cnn((1, 28, 28), 62))
    assert largest_layer(cnn) == "fc1"
    trainable = select_trainable(cnn, FedPTConfig(freeze=["fc1.*"]))
    assert trainable == select_trainable(cnn, FedPTConfig(freeze="largest"))
    n_train = sum(int(np.prod(cnn.shapes[cnn.names.index(n)])) for n in trainable)
    assert (cnn.size, n_train) == (1_206_590, 26_814)
    assert round(cnn.size / n_train) == 45  # the paper's 45x on the EMNIST CNN
    # trainable = globs is the complement
    assert select_trainable(cnn, FedPTConfig(trainable=["conv*", "fc2.*"])) == trainable


def test_selection_errors_name_the_key():
    flat = FlatModel(build_cnn((1, 28, 28), 62))
    with pytest.raises(UserError, match=r"fedpt.freeze: 'fc3\.\*' matches no parameter"):
        select_trainable(flat, FedPTConfig(freeze=["fc3.*"]))
    with pytest.raises(UserError, match="fedpt.trainable"):
        select_trainable(flat, FedPTConfig(trainable=["nothing"]))
    with pytest.raises(UserError, match="nothing would train"):
        select_trainable(flat, FedPTConfig(freeze=["*"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=fedpt"], "needs fedpt.freeze or fedpt.trainable"),
        (["algorithm=fedpt", 'fedpt.freeze="largest"', 'fedpt.trainable=["*"]'], "not both"),
        (["algorithm=fedpt", 'fedpt.freeze="smallest"'], '"largest" or a list'),
        (["algorithm=fedpt", "fedpt.trainable=[]"], "nothing would train"),
        (["algorithm=fedpt", "fedpt.freeze=3"], "fedpt.freeze"),
        ([*LARGEST, "fedpt.lr_scale=0"], "fedpt.lr_scale must be"),
        ([*LARGEST, "fedpt.lr_scale=-2.5"], "fedpt.lr_scale must be"),
        ([*LARGEST, 'fedpt.lr_scale="fast"'], "fedpt.lr_scale"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_job(QUICKSTART, overrides)


# --------------------------------------------------------------------------- frozen and unsent


@pytest.fixture(scope="module")
def largest(tmp_path_factory):
    """One 3-round FedPT run (freeze = "largest"), and its initial model."""
    return _run(tmp_path_factory.mktemp("fedpt"), "pt", LARGEST)


def test_frozen_weights_unchanged_out_of_optimizer_and_never_sent(largest):
    run, initial = largest
    strategy = run.strategy
    frozen = _frozen(run)
    assert frozen.sum() == 64 * 128 + 128 and strategy.trainable_size == 1290
    # bit-identical to the seeded initial model after training, in the state and in the module
    assert np.array_equal(run.state["model"][frozen], initial[frozen])
    assert np.array_equal(run.flat.get()[frozen], initial[frozen])
    assert not np.array_equal(run.state["model"][~frozen], initial[~frozen])  # the rest trained
    # out of the optimiser, no gradients
    params = dict(run.flat.module.named_parameters())
    assert not params["hidden.0.weight"].requires_grad and params["hidden.0.weight"].grad is None
    in_opt = {id(p) for g in strategy.trainer.opt.param_groups for p in g["params"]}
    assert in_opt == {id(params["output.weight"]), id(params["output.bias"])}
    # the round's collective carries the trainable part only
    assert run.packed.view("value").size == 1290 and run.packed.view("weight").size == 1


def test_message_size_is_the_trainable_encoding(largest):
    run, _ = largest
    cols = read_metrics(run.run_dir / "log.h5")[1]
    trainable = run.state["model"][run.strategy.index]
    one = len(IdentityCodec().encode(trainable, {})[0])
    assert one == 4 * 1290 + 25
    assert cols["bytes_up"].tolist() == [5 * one] * 3
    assert cols["bytes_down"].tolist() == [5 * one] * 3
    full = len(IdentityCodec().encode(run.state["model"], {})[0])  # what FedAvg sends
    assert full / one > 7  # 38,465 / 5,185 bytes per message


# --------------------------------------------------------------------------- nothing frozen == FedAvg


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "fedavg.server_optimizer=adam",
            "fedavg.server_lr=0.01",
            "compress.quantization=uniform",  # (top-k too would add 6 s of Numba compilation)
            "compress.error_feedback=true",
            "compress.direction=both",
        ],
    ],
)
def test_nothing_frozen_equals_fedavg(tmp_path, overrides):
    fedavg, _ = _run(tmp_path, "fa", overrides)
    fedpt, _ = _run(tmp_path, "pt", ["algorithm=fedpt", 'fedpt.trainable=["*"]', *overrides])
    assert fedpt.strategy.trainable_size == fedpt.flat.size
    for key in fedavg.state:
        np.testing.assert_array_equal(fedpt.state[key], fedavg.state[key])
    a = read_metrics(fedavg.run_dir / "log.h5")[1]
    b = read_metrics(fedpt.run_dir / "log.h5")[1]
    for col in ("train_loss", "bytes_up", "bytes_down", "test_accuracy"):
        np.testing.assert_array_equal(a[col], b[col])


# --------------------------------------------------------------------------- client lr (lr_scale)


def test_auto_lr_scale_only_for_a_head_on_frozen_layers_without_dp():
    torch.manual_seed(0)
    mlp = FlatModel(build_model(ModelConfig(hidden=[16, 8]), (64,), 10))
    job = load_job(QUICKSTART, LARGEST)
    head = select_trainable(mlp, FedPTConfig(freeze=["hidden.*"]))
    assert is_head(mlp, head) and lr_scale(job, mlp, head) == HEAD_LR_SCALE == 40
    dp = load_job(QUICKSTART, [*LARGEST, "dp.clip=0.5"])
    assert lr_scale(dp, mlp, head) == 1.0  # under DP the clip S sets the step
    fixed = load_job(QUICKSTART, [*LARGEST, "fedpt.lr_scale=3"])
    assert lr_scale(fixed, mlp, head) == 3.0
    # not a head: nothing frozen, a trainable layer before a frozen one (the CNN's convs before fc1)
    for trainable in (["*"], ["hidden.0.*", "output.*"], ["hidden.0.*"]):
        names = select_trainable(mlp, FedPTConfig(trainable=trainable))
        assert not is_head(mlp, names) and lr_scale(job, mlp, names) == 1.0
    cnn = FlatModel(build_cnn((1, 28, 28), 62))
    assert not is_head(cnn, select_trainable(cnn, FedPTConfig(freeze="largest")))


def test_lr_scale_multiplies_the_client_lr_by_hand(tmp_path):
    """One round, one client, one full-batch step: the head moves by -train.lr x lr_scale x its
    gradient at the initial model, computed here with autograd."""
    one = ["clients_per_round=1", "train.batch_size=1000", "rounds=1", "train.lr=0.25", "fedpt.lr_scale=4.0"]
    job = load_job(QUICKSTART, [f"out={tmp_path}", "name=hand", *SMALL, *LARGEST, *one])
    run = Run(job, world(), job.run_dir, progress=False)
    initial = run.state["model"].copy()
    assert run.strategy.trainer.cfg.lr == 1.0
    (client,) = cohort(job.seed, 0, run.data.num_clients, 1)
    x, y = run.data.client(int(client))
    run.flat.set(initial)
    module = run.flat.module
    loss = torch.nn.functional.cross_entropy(module(x), y)
    grads = torch.autograd.grad(loss, [module.output.weight, module.output.bias])
    expected = [
        p.detach() - 0.25 * 4.0 * g for p, g in zip((module.output.weight, module.output.bias), grads)
    ]
    run.create_files()
    run.loop()
    run.flat.set(run.state["model"])
    np.testing.assert_allclose(module.output.weight.detach(), expected[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(module.output.bias.detach(), expected[1], rtol=0, atol=1e-6)


def test_lr_scale_equals_the_scaled_train_lr(tmp_path):
    scaled, _ = _run(tmp_path, "scaled", [*LARGEST, "train.lr=0.25", "fedpt.lr_scale=4.0"])
    plain, _ = _run(tmp_path, "plain", [*LARGEST, "train.lr=1.0", "fedpt.lr_scale=1.0"])
    np.testing.assert_array_equal(scaled.state["model"], plain.state["model"])
    auto, _ = _run(tmp_path, "auto", LARGEST)  # quickstart's train.lr = 0.05, x 40
    assert auto.strategy.trainer.cfg.lr == 2.0 and auto.job.train.lr == 0.05


def test_resume_with_the_scaled_lr_equals_an_uninterrupted_run(tmp_path):
    keys = [f"out={tmp_path}", *SMALL, "checkpoint_every=3", *LARGEST]  # lr_scale "auto": x40
    straight = run_in_process(load_job(QUICKSTART, [*keys, "name=straight", "rounds=6"]))
    run_in_process(load_job(QUICKSTART, [*keys, "name=parts", "rounds=3"]))
    resumed = run_in_process(load_job(QUICKSTART, [*keys, "name=parts", "rounds=6"]), resume=True)
    assert resumed.strategy.trainer.cfg.lr == 2.0
    assert_resume_matches(straight, resumed, tmp_path, ("train_loss", "bytes_up", "bytes_down"))
