"""The [dp] table: clipping and aggregation maths by hand, the accountant against dp-accounting
itself, DP updates as the engine sees them, resume exactness. Noise across ranks: test_mpi_fedpt.py."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.algorithms.dp import DifferentialPrivacy, clip_l2
from hpcfed.comm import world
from hpcfed.config import DPConfig, UserError, load_job
from hpcfed.rng import numpy_generator
from hpcfed.runner import Run

from .conftest import QUICKSTART, assert_resume_matches, run_in_process

SMALL = ["data.num_clients=20", "clients_per_round=5", "eval_every=2", "checkpoint_every=100"]
DP = ["dp.clip=0.5", "dp.noise_multiplier=0.8", "dp.delta=1e-4"]
FEDPT = ["algorithm=fedpt", 'fedpt.freeze="largest"']


class SelfComm:
    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0


def _job(tmp_path, name, overrides, rounds):
    return load_job(QUICKSTART, [f"out={tmp_path}", f"name={name}", f"rounds={rounds}", *SMALL, *overrides])


def _run(tmp_path, name, overrides, rounds=6, resume=False):
    return run_in_process(_job(tmp_path, name, overrides, rounds), resume=resume)


# --------------------------------------------------------------------------- maths by hand


def test_clip_hand_computed():
    clipped, was = clip_l2(np.array([3.0, 4.0]), 1.0)  # norm 5 -> scaled by 1/5
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    assert was
    same, was = clip_l2(np.array([0.3, 0.4], dtype=np.float32), 1.0)  # norm 0.5 <= 1: untouched
    assert not was and same.dtype == np.float64
    np.testing.assert_array_equal(same, np.array([0.3, 0.4], dtype=np.float32).astype(np.float64))
    exact, was = clip_l2(np.array([0.0, 2.0]), 2.0)  # on the bound: untouched
    assert not was and exact.tolist() == [0.0, 2.0]


def test_average_hand_computed():
    # two clients send [3, 4] and [0.3, 0.4]; S = 1: clipped [0.6, 0.8] and [0.3, 0.4], sum [0.9, 1.2]
    cfg = DPConfig(clip=1.0, noise_multiplier=0.0, delta=1e-5)
    dp = DifferentialPrivacy(cfg, seed=7, comm=SelfComm(), num_clients=10, clients_per_round=2)
    total = clip_l2(np.array([3.0, 4.0]), 1.0)[0] + clip_l2(np.array([0.3, 0.4]), 1.0)[0]
    np.testing.assert_allclose(dp.average(total, round_index=3), [0.45, 0.6])  # / cohort 2
    # with sigma = 0.5: noise of std sigma * S = 0.5 from the (seed, "dp-noise", round) generator
    cfg = DPConfig(clip=1.0, noise_multiplier=0.5, delta=1e-5)
    dp = DifferentialPrivacy(cfg, seed=7, comm=SelfComm(), num_clients=10, clients_per_round=2)
    noise = 0.5 * numpy_generator(7, "dp-noise", 3).standard_normal(2)
    np.testing.assert_array_equal(dp.average(total, round_index=3), (total + noise) / 2)
    assert not np.array_equal(dp.noise(2, 3), dp.noise(2, 4))  # a fresh draw each round
    np.testing.assert_array_equal(dp.noise(2, 3), noise)  # and the same draw for the same round


def test_noise_std_and_secure_noise():
    cfg = DPConfig(clip=2.0, noise_multiplier=1.5, delta=1e-5, secure_noise=True)
    dp = DifferentialPrivacy(cfg, seed=0, comm=SelfComm(), num_clients=10, clients_per_round=2)
    a, b = dp.noise(200_000, 0), dp.noise(200_000, 0)
    assert not np.array_equal(a, b)  # from the OS: not reproducible, by design
    assert abs(a.std() - 3.0) < 0.03 and abs(a.mean()) < 0.03


def test_epsilon_equals_dp_accounting():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    cfg = DPConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5)
    dp = DifferentialPrivacy(cfg, seed=0, comm=SelfComm(), num_clients=100, clients_per_round=10)
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1))
    accountant = RdpAccountant()
    previous = 0.0
    for rounds in range(1, 9):
        accountant.compose(event)  # one composition per round, as the run goes
        eps = dp.epsilon(rounds)
        assert np.isfinite(eps) and eps >= previous
        assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        previous = eps
    direct = RdpAccountant().compose(event, 8).get_epsilon(1e-5)
    assert dp.epsilon(8) == pytest.approx(direct, rel=1e-12)
    assert dp.epsilon(0) == 0.0


# --------------------------------------------------------------------------- config


def test_dp_config_errors():
    with pytest.raises(UserError, match="dp.clip"):
        load_job(QUICKSTART, ["dp.clip=0"])
    with pytest.raises(UserError, match="dp.delta"):
        load_job(QUICKSTART, ["dp.delta=1.5"])
    with pytest.raises(UserError, match="unknown key 'dp.sigma'"):
        load_job(QUICKSTART, ["dp.sigma=1.0"])
    assert load_job(QUICKSTART, []).dp is None  # no [dp] table: no DP
    assert load_job(QUICKSTART, ["dp.clip=2.0"]).dp.noise_multiplier == 1.0
    # an algorithm without DP support is refused by name (its class says supports_dp = False)
    with pytest.raises(UserError, match=r"\[dp\] works with fedavg, fedpt .*not algorithm 'prism'"):
        load_job(QUICKSTART, ["algorithm=prism", "dp.clip=1.0"])


# --------------------------------------------------------------------------- in the engine


@pytest.mark.parametrize("algorithm", [[], FEDPT], ids=["fedavg", "fedpt"])
def test_client_updates_are_clipped_and_unweighted(tmp_path, algorithm):
    job = _job(tmp_path, "u", [*algorithm, "dp.clip=0.05", "train.lr=0.5"], rounds=1)
    run = Run(job, world(), job.run_dir, progress=False)
    strategy = run.strategy
    strategy.begin_round(run.state, 0)
    for cid in range(3):
        update = strategy.client_update(run.state, cid, 0)
        assert update.weight == 1.0
        assert np.linalg.norm(update.value) <= 0.05 * (1 + 1e-12)
        assert update.metrics["clipped_updates"] == 1.0  # lr 0.5 moves far more than 0.05
    assert "clipped_updates" in run.packed.slices


@pytest.mark.parametrize("algorithm", [[], FEDPT], ids=["fedavg", "fedpt"])
def test_resume_with_dp_equals_uninterrupted(tmp_path, algorithm):
    overrides = [*algorithm, *DP, "fedavg.server_momentum=0.5"]
    straight = _run(tmp_path, "straight", overrides)
    _run(tmp_path, "parts", overrides, rounds=3)
    resumed = _run(tmp_path, "parts", overrides, resume=True)
    a, _ = assert_resume_matches(
        straight, resumed, tmp_path, ("train_loss", "bytes_up", "epsilon", "clipped_updates")
    )
    # epsilon is logged every round, finite, increasing, and the accountant's for q = 5/20
    eps = a["epsilon"]
    assert np.isfinite(eps).all() and (np.diff(eps) > 0).all()
    dp = DifferentialPrivacy(straight.job.dp, 0, SelfComm(), num_clients=20, clients_per_round=5)
    np.testing.assert_array_equal(eps, [dp.epsilon(t) for t in range(1, 7)])
