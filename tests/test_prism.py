"""PriSM: the SVD factorisation, compact sub-models from slices, kernel sampling, per-kernel
aggregation, and the strategy end to end in-process (bytes, resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcfed.algorithms.base import weighted_mean
from hpcfed.algorithms.prism import kernel_probabilities, sample_kernels
from hpcfed.comm import world
from hpcfed.config import ModelConfig, UserError, load_job
from hpcfed.flat import FlatModel
from hpcfed.io.metrics import read_metrics
from hpcfed.models import build_model
from hpcfed.models.factorized import (
    FactorSpace,
    channel_submodel,
    decomposable,
    kept,
    prism_submodel,
)
from hpcfed.rng import numpy_generator
from hpcfed.runner import Run

from .conftest import QUICKSTART, assert_resume_matches, run_in_process

SMALL = ["data.num_clients=20", "clients_per_round=5", "eval_every=2", "checkpoint_every=100"]
PRISM = ["algorithm=prism", "model.name=cnn", "prism.keep=0.25", "prism.layers=all"]


def _model(name: str, shape=(64,), seed: int = 0, **kw) -> FlatModel:
    torch.manual_seed(seed)
    return FlatModel(build_model(ModelConfig(name=name, **kw), shape, 10))


def _space(flat: FlatModel, layers: str = "all") -> FactorSpace:
    return FactorSpace(flat, decomposable(flat.module, layers))


def _all_kernels(space: FactorSpace) -> list[np.ndarray]:
    return [np.arange(L.rank) for L in space.layers]


# --------------------------------------------------------------------------- factorisation


@pytest.mark.parametrize("name,shape", [("cnn", (64,)), ("resnet8", (3, 16, 16)), ("mlp", (64,))])
def test_decompose_then_recompose_reproduces_w(name, shape):
    flat = _model(name, shape)
    space = _space(flat)
    assert space.layers, "something must be factorised"
    w = flat.get()
    factors, svals = space.decompose(w)
    back = space.recompose(factors)
    for L, s in zip(space.layers, svals):
        rel = np.linalg.norm(back[L.w] - w[L.w]) / np.linalg.norm(w[L.w])
        assert rel < 1e-5, (L.name, rel)
        assert np.all(np.diff(s) <= 0)  # descending
    others = np.ones(w.size, bool)
    for L in space.layers:
        others[L.w] = False
    np.testing.assert_array_equal(back[others], w[others])
    # deterministic: the same bits from the same W (what every rank relies on)
    np.testing.assert_array_equal(space.decompose(w)[0], factors)


def test_which_layers_are_factorised():
    cnn = _model("cnn").module
    assert decomposable(cnn, "conv") == ["conv2"]  # conv1 has 1 input channel
    assert decomposable(cnn, "all") == ["conv2", "fc1"]  # never the classifier
    res = _model("resnet8", (3, 16, 16)).module
    names = decomposable(res, "conv")
    assert "conv1" not in names and not any("shortcut" in n for n in names)  # stem, 1x1 convs
    assert len(names) == 6


@pytest.mark.parametrize("name,shape", [("cnn", (64,)), ("resnet8", (3, 16, 16))])
def test_keep_one_with_all_kernels_gives_the_original_output(name, shape):
    flat = _model(name, shape)
    space = _space(flat)
    factors, _ = space.decompose(flat.get())
    sub = prism_submodel(flat.module, space, keep=1.0, out_keep=1.0)
    sub.flat.set(factors[sub.index(_all_kernels(space))])
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    flat.module.eval(), sub.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub.module(x), flat.module(x), rtol=1e-5, atol=1e-5)
    # one layer alone, too
    conv = flat.module.get_submodule(space.layers[0].name)
    low = sub.module.get_submodule(space.layers[0].name)
    h = torch.randn(2, conv.in_channels, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(low(h), conv(h), rtol=1e-5, atol=1e-5)


def test_compact_submodel_really_is_smaller():
    flat = _model("cnn")
    space = _space(flat)
    sub = prism_submodel(flat.module, space, keep=0.25, out_keep=1.0)
    # conv2: 8 of 32 kernels (8x16x3x3 + 32x8), fc1: 16 of 64 (16x512 + 64x16)
    assert sub.module.conv2.v.weight.shape == (8, 16, 3, 3)
    assert sub.module.conv2.u.weight.shape == (32, 8, 1, 1)
    assert sub.module.fc1.v.weight.shape == (16, 512) and sub.module.fc1.u.weight.shape == (64, 16)
    assert sub.params < 0.35 * flat.size
    idx = sub.index([np.arange(8), np.arange(16)])
    assert np.unique(idx).size == idx.size == sub.params  # a gather without repeats


# --------------------------------------------------------------------------- sampling


def test_sampling_frequency_rises_with_the_singular_value():
    s = np.linspace(2.0, 0.2, 10)
    counts = np.zeros(10)
    rng = numpy_generator(0, "test-prism")
    for _ in range(4000):
        counts[sample_kernels(rng, s, 3, "principal", 3.0)] += 1
    assert counts.sum() == 4000 * 3
    assert np.all(np.diff(counts) < 0), counts  # strictly decreasing with s
    assert counts[0] > 5 * counts[-1]
    p = kernel_probabilities(s, 3.0)
    np.testing.assert_allclose(p, s**3 / np.sum(s**3))
    # the ablations
    assert sample_kernels(rng, s, 3, "top", 3.0).tolist() == [0, 1, 2]
    uniform = np.zeros(10)
    for _ in range(4000):
        uniform[sample_kernels(rng, s, 3, "uniform", 3.0)] += 1
    assert uniform.min() > 0.8 * uniform.max()


def test_sampling_never_runs_out_of_kernels():
    s = np.array([1.0, 0.0, 0.0, 0.0])  # a rank-1 layer: zero probabilities are floored
    rng = numpy_generator(0, "test-prism")
    picked = sample_kernels(rng, s, 3, "principal", 3.0)
    assert len(set(picked.tolist())) == 3 and 0 in picked
    assert sample_kernels(rng, np.zeros(3), 2, "principal", 3.0).size == 2
    assert kept(0.2, 5) == 1 and kept(0.25, 32) == 8 and kept(0.2, 64) == 13 and kept(0.01, 3) == 1


# --------------------------------------------------------------------------- slices vs masks


@pytest.mark.parametrize("out_keep", [1.0, 0.5])
def test_slice_and_mask_training_give_identical_gradients(out_keep):
    """The compact model's gradients equal the masked full-rank model's on the sampled entries
    (and the masked model's are zero elsewhere): slicing is the authors' masking, smaller."""
    flat = _model("cnn")
    space = _space(flat)
    factors, svals = space.decompose(flat.get())
    rng = numpy_generator(3, "test-prism")
    kernels = [
        sample_kernels(rng, s, kept(0.25, L.rank), "principal", 3.0) for L, s in zip(space.layers, svals)
    ]

    compact = prism_submodel(flat.module, space, keep=0.25, out_keep=out_keep)
    compact.flat.set(factors[compact.index(kernels)])
    masked = prism_submodel(flat.module, space, keep=1.0, out_keep=1.0)
    masked.flat.set(factors[masked.index(_all_kernels(space))])
    for L, S in zip(space.layers, kernels):
        layer = masked.module.get_submodule(L.name)
        keep_k = torch.zeros(L.rank)
        keep_k[S] = 1.0
        keep_o = torch.zeros(L.out)
        keep_o[: kept(out_keep, L.out)] = 1.0
        shape = (1, -1, 1, 1) if isinstance(layer.v, torch.nn.Conv2d) else (1, -1)
        layer.v.register_forward_hook(lambda m, i, o, k=keep_k, s=shape: o * k.view(s))
        layer.u.register_forward_hook(lambda m, i, o, k=keep_o, s=shape: o * k.view(s))

    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    y = torch.arange(16) % 10
    grads = {}
    for name, sub in (("compact", compact), ("masked", masked)):
        sub.module.eval()
        sub.module.zero_grad()
        loss = torch.nn.functional.cross_entropy(sub.module(x), y)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in sub.module.named_parameters()}
        grads[name + "_loss"] = loss.detach()
    torch.testing.assert_close(grads["compact_loss"], grads["masked_loss"], rtol=1e-6, atol=1e-6)
    gc, gm = grads["compact"], grads["masked"]
    for L, S in zip(space.layers, kernels):
        o = kept(out_keep, L.out)
        v, u = gm[f"{L.name}.v.weight"], gm[f"{L.name}.u.weight"]
        torch.testing.assert_close(gc[f"{L.name}.v.weight"], v[S], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gc[f"{L.name}.u.weight"], u[:o][:, S], rtol=1e-5, atol=1e-7)
        rest = np.setdiff1d(np.arange(L.rank), S)
        assert torch.all(v[rest] == 0) and torch.all(u[:, rest] == 0) and torch.all(u[o:] == 0)
    for n in gc:
        if ".v." not in n and ".u." not in n:
            torch.testing.assert_close(gc[n], gm[n], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the strategy


def _run(tmp_path, name, overrides, rounds=6, resume=False):
    job = load_job(QUICKSTART, [f"out={tmp_path}", f"name={name}", f"rounds={rounds}", *SMALL, *overrides])
    return run_in_process(job, resume=resume)


def _strategy(tmp_path, overrides):
    job = load_job(QUICKSTART, [f"out={tmp_path}", *SMALL, *overrides])
    run = Run(job, world(), job.run_dir, progress=False)
    return run, run.strategy


def test_one_client_with_keep_one_aggregates_to_its_own_model(tmp_path):
    run, strategy = _strategy(tmp_path, [*PRISM, "prism.keep=1.0", "clients_per_round=1"])
    state = strategy.init_state()
    strategy.begin_round(state, 0)
    update = strategy.client_update(state, 7, 0)
    sub = strategy.submodel(0)[0]
    assert np.all(update.weight[sub.index(_all_kernels(strategy.space))] > 0)
    state = strategy.server_update(state, update, 0)
    # the client's trained low-rank model and the new global model compute the same function
    run.flat.set(state["model"])
    x = run.data.test[0][:64]
    run.flat.module.eval(), sub.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(run.flat.module(x), sub.module(x), rtol=1e-4, atol=1e-5)
    for L in strategy.space.layers:  # and W = A'B' of the client's factors
        v = sub.module.get_submodule(L.name).v.weight.detach().reshape(L.rank, -1).double()
        u = sub.module.get_submodule(L.name).u.weight.detach().reshape(L.out, -1).double()
        np.testing.assert_allclose(state["model"][L.w], (u @ v).numpy().ravel(), rtol=1e-5, atol=1e-6)


def test_unsampled_kernels_are_unchanged(tmp_path):
    _, strategy = _strategy(tmp_path, [*PRISM, "prism.keep=0.25"])
    state = strategy.init_state()
    strategy.begin_round(state, 0)
    old = strategy._factors.copy()
    total_v, total_w = np.zeros(strategy.space.size), np.zeros(strategy.space.size)
    sampled = [set() for _ in strategy.space.layers]
    for cid in (1, 2):
        update = strategy.client_update(state, cid, 0)
        total_v += update.value
        total_w += update.weight
        for i, S in enumerate(strategy.select(0, cid, 0.25)):
            sampled[i] |= set(S.tolist())
    new = weighted_mean(type(update)(total_v, total_w), old)
    for L, seen in zip(strategy.space.layers, sampled):
        rest = np.setdiff1d(np.arange(L.rank), sorted(seen))
        assert rest.size > 0
        A_old, A_new = (f[L.a : L.b].reshape(L.out, L.rank) for f in (old, new))
        B_old, B_new = (f[L.b : L.b + L.rank * L.fan_in].reshape(L.rank, L.fan_in) for f in (old, new))
        np.testing.assert_array_equal(A_new[:, rest], A_old[:, rest])
        np.testing.assert_array_equal(B_new[rest], B_old[rest])
        assert not np.array_equal(B_new[sorted(seen)], B_old[sorted(seen)])  # the sampled ones trained


def test_overlapping_kernels_are_averaged_over_the_clients_that_sampled_them(tmp_path):
    _, strategy = _strategy(tmp_path, [*PRISM, "prism.sampling=top"])  # both clients: the same kernels
    state = strategy.init_state()
    strategy.begin_round(state, 0)
    ups = [strategy.client_update(state, cid, 0) for cid in (1, 2)]
    n = [u.metrics["samples"] for u in ups]
    idx = strategy.submodel(0)[0].index(strategy.select(0, 1, 0.25))
    trained = [u.value[idx] / u.weight[idx] for u in ups]
    total = type(ups[0])(ups[0].value + ups[1].value, ups[0].weight + ups[1].weight)
    new = weighted_mean(total, strategy._factors)
    np.testing.assert_allclose(new[idx], (n[0] * trained[0] + n[1] * trained[1]) / (n[0] + n[1]), rtol=1e-12)


def test_channels_with_keep_one_is_fedavg(tmp_path):
    a = _run(tmp_path, "fedavg", ["model.name=cnn"], rounds=2)
    b = _run(
        tmp_path,
        "channels",
        ["model.name=cnn", "algorithm=prism", "prism.sampling=channels", "prism.keep=1.0"],
        rounds=2,
    )
    np.testing.assert_array_equal(a.state["model"], b.state["model"])


def test_channel_prefix_submodel_shapes():
    flat = _model("resnet8", (3, 16, 16))
    space = FactorSpace(flat, [])
    sub = channel_submodel(flat.module, space, keep=0.25, layers="conv")
    m = sub.module
    assert m.conv1.weight.shape == (4, 3, 3, 3)  # 16 -> 4 (one GroupNorm group of 4)
    assert m.layer2[0].conv1.weight.shape == (8, 4, 3, 3) and m.layer3[0].conv2.weight.shape == (16, 16, 3, 3)
    assert m.fc.weight.shape == (10, 16)
    torch.manual_seed(0)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    idx = sub.index()
    assert np.unique(idx).size == idx.size == sub.params


def test_bytes_are_the_slices_and_shrink(tmp_path):
    fedavg = read_metrics(_run(tmp_path, "fedavg", ["model.name=cnn"], rounds=1).run_dir / "log.h5")[1]
    run = _run(tmp_path, "prism", PRISM, rounds=1)
    cols = read_metrics(run.run_dir / "log.h5")[1]
    sub = run.strategy.submodel(0)[0]
    one = 4 * sub.params + 25  # float32 slices behind the codec header
    assert cols["bytes_up"][0] == 5 * one
    assert cols["bytes_down"][0] == 5 * (one + 4 * (8 + 16))  # + the kernel indices
    assert cols["bytes_up"][0] <= 0.35 * fedavg["bytes_up"][0]
    assert cols["sub_params"][0] == sub.params
    assert 0 < cols["sub_macs"][0] < 0.5 * 4_000_000 and cols["sub_peak_memory"][0] > 4 * sub.params


@pytest.mark.parametrize(
    "overrides",
    [
        PRISM,
        [
            *PRISM,
            "prism.keep=[0.25, 0.5]",
            "prism.keep_probs=[0.5, 0.5]",
            "prism.out_keep=0.5",
            "train.momentum=0.9",
        ],
        [*PRISM, "prism.sampling=channels"],
    ],
    ids=["principal", "heterogeneous", "channels"],
)
def test_resume_equals_uninterrupted(tmp_path, overrides):
    straight = _run(tmp_path, "straight", overrides)
    _run(tmp_path, "parts", overrides, rounds=3)
    resumed = _run(tmp_path, "parts", overrides, resume=True)
    cols = ("train_loss", "bytes_up", "bytes_down", "sub_params", "sub_macs")
    assert_resume_matches(straight, resumed, tmp_path, cols)


def test_config_is_checked():
    with pytest.raises(UserError, match="keep_probs"):
        load_job(QUICKSTART, ["algorithm=prism", "prism.keep=[0.25, 0.5]", "prism.keep_probs=[1.0]"])
    with pytest.raises(UserError, match="keep"):
        load_job(QUICKSTART, ["algorithm=prism", "prism.keep=0"])
    with pytest.raises(UserError, match="sampling"):
        load_job(QUICKSTART, ["algorithm=prism", "prism.sampling=random"])


def test_error_feedback_is_refused(tmp_path):
    with pytest.raises(UserError, match="error_feedback"):
        _strategy(tmp_path, [*PRISM, "compress.quantization=sign", "compress.error_feedback=true"])


def test_prism_refuses_sequence_models_on_load():
    from hpcfed.config import UserError, load_job

    from .conftest import QUICKSTART

    for name in ("char_lstm", "char_transformer"):
        with pytest.raises(UserError, match=f"model.name = '{name}': algorithm 'prism'"):
            load_job(QUICKSTART, ["algorithm=prism", f"model.name={name}"])
