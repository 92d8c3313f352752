"""The engine's pieces: aggregation maths (hand-computed), placement, generators, flat models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from hpcfed.algorithms.base import Update, weighted_mean
from hpcfed.algorithms.fedavg import FedAvg
from hpcfed.comm import PackedAllreduce
from hpcfed.config import load_job
from hpcfed.flat import FlatModel
from hpcfed.placement import assign, assign_balanced, assign_fixed, training_cost
from hpcfed.rng import cohort, numpy_generator, torch_generator

from .conftest import QUICKSTART, cli_env


class SelfComm:
    """COMM_SELF-like stand-in for size-1 maths tests (the real MPI runs in test_mpi.py)."""

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0


def test_weighted_mean_scalar_weight():
    # clients with 2 and 6 samples send deltas [1, 1] and [3, -1]: (2*[1,1] + 6*[3,-1]) / 8
    total = Update(value=np.array([2 + 18, 2 - 6.0]), weight=8.0)
    np.testing.assert_allclose(weighted_mean(total, np.zeros(2)), [2.5, -0.5])


def test_weighted_mean_per_element_keeps_untrained():
    # element 0 trained by two clients (w 1 and 3), element 1 by one, element 2 by nobody
    total = Update(value=np.array([1 * 2.0 + 3 * 4.0, 5.0, 0.0]), weight=np.array([4.0, 1.0, 0.0]))
    np.testing.assert_allclose(weighted_mean(total, np.array([9.0, 9.0, 7.0])), [3.5, 5.0, 7.0])


def test_weighted_mean_nobody_reported_keeps_model():
    np.testing.assert_array_equal(weighted_mean(Update(np.zeros(2), 0.0), np.array([1.0, 2.0])), [1.0, 2.0])


def _fedavg(overrides=()):
    job = load_job(QUICKSTART, ["data.num_clients=10", "clients_per_round=2", *overrides])
    module = torch.nn.Linear(2, 1, bias=False)
    flat = FlatModel(module)
    flat.set(np.array([1.0, 1.0]))
    return FedAvg(job, flat, data=None, device=torch.device("cpu"), comm=SelfComm())


def test_fedavg_server_sgd_is_weighted_average():
    s = _fedavg()
    state = s.init_state()
    # deltas [1, 0] (n=1) and [0, 2] (n=3): mean [0.25, 1.5]
    new = s.server_update(state, Update(np.array([1.0, 6.0]), np.array([4.0])), 0)
    np.testing.assert_allclose(new["model"], [1.25, 2.5])
    assert new["model"].dtype == np.float32


def test_fedavg_server_momentum_hand_computed():
    s = _fedavg(["fedavg.server_momentum=0.5", "fedavg.server_lr=2.0"])
    state = s.init_state()
    state = s.server_update(state, Update(np.array([1.0, 0.0]), 1.0), 0)  # m = [1, 0]; w += 2m
    np.testing.assert_allclose(state["model"], [3.0, 1.0])
    state = s.server_update(state, Update(np.array([0.0, 1.0]), 1.0), 1)  # m = [0.5, 1]
    np.testing.assert_allclose(state["model"], [4.0, 3.0])


def test_fedadam_hand_computed():
    s = _fedavg(
        [
            "fedavg.server_optimizer=adam",
            "fedavg.server_lr=0.1",
            "fedavg.beta1=0.5",
            "fedavg.beta2=0.5",
            "fedavg.tau=1e-9",
        ]
    )
    state = s.server_update(s.init_state(), Update(np.array([2.0, -2.0]), 1.0), 0)
    # m = 0.5*2 = 1, v = 0.5*4 = 2, step = 1/sqrt(2)
    np.testing.assert_allclose(state["model"], [1 + 0.1 / np.sqrt(2), 1 - 0.1 / np.sqrt(2)], rtol=1e-6)


def test_balanced_placement_lpt():
    clients = np.array([0, 1, 2, 3, 4])
    costs = np.array([5, 4, 3, 3, 1])
    # LPT: 5->r0, 4->r1, 3->r1 (4<5), 3->r0 (5<7), 1->r1 (7<8): loads 8 and 8
    assert assign_balanced(clients, costs, 2) == [[0, 3], [1, 2, 4]]
    parts = assign(clients, costs, 3, "balanced")
    assert sorted(c for p in parts for c in p) == [0, 1, 2, 3, 4]


def test_fixed_placement_is_home_rank():
    assert assign_fixed(np.array([0, 1, 2, 3, 4, 5]), 4) == [[0, 4], [1, 5], [2], [3]]
    assert assign(np.array([7]), np.array([1]), 1, "fixed") == [[7]]


def test_generators_are_keyed_not_stateful():
    a = numpy_generator(0, "cohort", 3).random(4)
    assert np.array_equal(a, numpy_generator(0, "cohort", 3).random(4))
    assert not np.array_equal(a, numpy_generator(0, "cohort", 4).random(4))
    assert not np.array_equal(a, numpy_generator(0, "dropout", 3).random(4))
    t1 = torch.randperm(10, generator=torch_generator(1, "train", 2, 3))
    t2 = torch.randperm(10, generator=torch_generator(1, "train", 2, 3))
    assert torch.equal(t1, t2)


def test_cohort_uniform_without_replacement():
    c = cohort(0, 5, 100, 10)
    assert len(set(c.tolist())) == 10 and c.min() >= 0 and c.max() < 100
    counts = np.bincount(np.concatenate([cohort(0, r, 20, 5) for r in range(4000)]), minlength=20)
    assert abs(counts / 4000 - 0.25).max() < 0.03


def test_flat_model_views_and_state_dict():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flat = FlatModel(m)
    # num_batches_tracked is an integer buffer: outside the vector
    assert flat.size == 3 * 4 + 4 + 4 + 4 + 4 + 4 + 4 * 2 + 2
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    flat.set(np.arange(flat.size, dtype=np.float32))
    assert m[0].weight.flatten()[0].item() == 0.0 and m[2].bias[-1].item() == flat.size - 1
    m[0].weight.data.mul_(0)  # in-place updates (optimiser steps) land in the vector
    assert flat.get()[:12].sum() == 0
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    m2.load_state_dict(flat.state_dict(), strict=True)


def test_packed_allreduce_layout_single_rank():
    packed = PackedAllreduce(SelfComm(), {"value": 3, "weight": 1, "stop": 1})
    packed.view("value")[:] = [1, 2, 3]
    packed.view("stop")[0] = 1
    out = packed.allreduce()
    assert out["value"].tolist() == [1, 2, 3] and out["stop"][0] == 1 and out["weight"][0] == 0
    # a new round: zeroing is lazy, but every field reads as zero, adds accumulate from zero, and
    # fields nobody touched reach the collective as zeros
    packed.zero()
    packed.add("value", np.array([5.0, 6.0, 7.0]))
    packed.add("value", np.array([1.0, 1.0, 1.0]))
    packed.add("weight", 2.0)
    assert packed.view("stop")[0] == 0
    out = packed.allreduce()
    assert out["value"].tolist() == [6, 7, 8] and out["weight"][0] == 2 and out["stop"][0] == 0
    packed.zero()
    assert all(v.sum() == 0 for v in packed.allreduce().values())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_local_sgd_fresh_optimiser_per_client(momentum):
    from hpcfed.config import TrainConfig
    from hpcfed.train import LocalSGD

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    trainer = LocalSGD(m, TrainConfig(lr=0.1, momentum=momentum, batch_size=2))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    trainer.train(x, y, torch_generator(0, "train", 0, 0))
    after_first = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(start)
    trainer.train(x, y, torch_generator(0, "train", 0, 0))  # same client again: same result
    for k, v in m.state_dict().items():
        assert torch.equal(v, after_first[k])


def test_world_leaves_no_mpi_settings_for_child_processes():
    import os

    from hpcfed.comm import world

    before = {k: v for k, v in os.environ.items() if k.startswith("OMPI_MCA")}
    assert world().Get_size() >= 1
    assert {k: v for k, v in os.environ.items() if k.startswith("OMPI_MCA")} == before


def test_training_cost_counts_steps_plus_one_by_hand():
    # 14 samples at batch 10: 2 steps per epoch; 20 samples: 2; 21: 3; 0: none, the fixed cost only
    np.testing.assert_array_equal(training_cost(np.array([14, 20, 21, 0]), 5, 10), [11, 11, 16, 1])


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3), (0.0, 1e-2)])
def test_sgd_equals_torch_optim_sgd_bit_for_bit(momentum, weight_decay):
    """hpcfed.train.SGD (the functional update, no torch._dynamo import) against torch.optim.SGD,
    over two 'clients' with the state cleared between them, a frozen parameter and dropout."""
    from hpcfed.train import SGD

    def run(make):
        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
        )
        m[0].bias.requires_grad_(False)
        opt = make([p for p in m.parameters() if p.requires_grad])
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        for _ in range(2):
            opt.clear() if isinstance(opt, SGD) else opt.state.clear()
            for i in range(0, 64, 5):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x[i : i + 5]), y[i : i + 5]).backward()
                opt.step()
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    ours = run(lambda ps: SGD(ps, lr=0.05, momentum=momentum, weight_decay=weight_decay))
    reference = run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=weight_decay))
    assert torch.equal(ours, reference)


def test_a_run_imports_neither_dynamo_nor_sklearn_nor_numba(tmp_path):
    """Start-up: an uncompressed digits run needs none of them (~3 s and ~300 MB per rank). The
    first run computes the digits split with scikit-learn and caches it; the second must not."""

    def run(name: str) -> str:
        code = (
            "import sys; from hpcfed.cli import main; "
            f"main(['run', {str(QUICKSTART)!r}, 'out={tmp_path}', 'name={name}', 'rounds=1']); "
            "heavy = ('torch._dynamo', 'sklearn', 'numba', 'matplotlib'); "
            "print(sorted(m for m in heavy if m in sys.modules))"
        )
        env = {**cli_env(), "HPCFED_CACHE": str(tmp_path / "cache")}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[-1]

    assert run("first") == "['sklearn']"
    assert run("second") == "[]"


def test_vectorised_generators_equal_one_by_one():
    """rng.torch_generators reproduces NumPy's SeedSequence for a whole group at once."""
    from hpcfed.rng import torch_generators

    clients = np.arange(0, 3000, 7)
    for seed, rnd in ((0, 0), (3, 17), (2**31 + 5, 99_999), (123_456_789, 2**32 - 1)):
        batch = [g.initial_seed() for g in torch_generators(seed, "train", rnd, clients)]
        assert batch == [torch_generator(seed, "train", rnd, int(c)).initial_seed() for c in clients]
    # keys beyond 32 bits take the one-by-one path, with the same result
    big = [g.initial_seed() for g in torch_generators(2**40, "train", 1, [5])]
    assert big == [torch_generator(2**40, "train", 1, 5).initial_seed()]


def test_groups_are_cut_from_the_cohort_not_the_rank_count():
    from hpcfed.placement import assign_groups

    clients = np.arange(0, 40, 3)
    costs = training_cost(np.arange(14) % 5 + 1, 1, 1)
    for group in (1, 4, 5, 64):
        per_size = []
        for size in (1, 2, 3):
            placed = assign_groups(clients, costs, size, "balanced", group)
            assert sorted(c for rank in placed for g in rank for c in g) == sorted(clients.tolist())
            per_size.append(sorted(tuple(g) for rank in placed for g in rank))
        assert per_size[0] == per_size[1] == per_size[2]  # the same groups on 1, 2 and 3 ranks
        assert all(len(g) <= group for g in per_size[0])
