"""HADFL under MPI: ``mpirun -n 2`` and ``-n 3 python -m pytest --with-mpi -m mpi tests/test_mpi_hadfl.py``.

Devices live on rank d mod size; pairings come from (seed, round) alone, so every rank computes
the same pairs, and cross-rank pairs swap their models point to point. As in test_mpi_prism.py,
the job runs on COMM_WORLD and, on rank 0, on COMM_SELF, and every rank asserts facts agreed by a
bcast, so a failure never leaves a rank waiting in a collective.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.algorithms.hadfl import local_steps, pairing, resolve_speeds, select
from hpcfed.config import load_job
from hpcfed.rng import numpy_generator

from .conftest import ROOT, assert_resume_matches, run_in_process, shared_tmp

pytestmark = pytest.mark.mpi

JOB = ROOT / "jobs" / "hadfl_digits.toml"
BASE = ["eval_every=2", "checkpoint_every=100", "hadfl.local_steps=8", "hadfl.max_staleness=2"]
# issue 19's options, all away from the paper's reading at once; a full average every 2 cycles
OPTIONS = [
    "hadfl.pair_weight=data",
    "hadfl.selection=staleness",
    "hadfl.lr_scale=per_cycle",
    "hadfl.full_average_every=2",
]
PAPER = [
    "hadfl.pair_weight=data_steps",
    "hadfl.selection=steps_staleness",
    "hadfl.lr_scale=same",
    "hadfl.full_average_every=0",
]


def _devices(run, comm) -> dict[str, np.ndarray]:
    """Every device model, gathered from the home ranks onto every rank."""
    return {k: v for part in comm.allgather(run.strategy.extra_state()) for k, v in part.items()}


def test_pairing_identical_on_every_rank():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tau = local_steps(resolve_speeds([1, 1, 1, 1, 2, 2, 4, 8], 10, 0), 8)
    staleness = np.zeros(10, dtype=np.int64)
    history = []
    for rnd in range(200):  # the staleness feeds back into the next selection, as in a run
        pairs = pairing(
            rng := numpy_generator(0, "hadfl", rnd), select(rng, tau, staleness, 0.4, 3, "steps_staleness")
        )
        synced = [d for pair in pairs for d in pair]
        staleness = np.where(np.isin(np.arange(10), synced), 0, staleness + 1)
        history.append(pairs)
    everyone = comm.allgather(history)
    assert all(h == everyone[0] for h in everyone)
    assert len({tuple(p) for p in history}) > 50  # and the pairings do vary from cycle to cycle


@pytest.mark.parametrize(
    "schedule, options",
    [("hadfl", []), ("hadfl", OPTIONS), ("hadfl", PAPER), ("dfedavg", []), ("sync", [])],
    ids=["hadfl", "hadfl-options", "hadfl-paper", "dfedavg", "sync"],
)
def test_one_two_three_ranks_same_device_models(schedule, options):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-hadfl-")
    rounds = 6 if schedule == "hadfl" else 2
    job = load_job(JOB, [f"out={tmp}", *BASE, f"rounds={rounds}", f"hadfl.schedule={schedule}", *options])
    world = run_in_process(job.model_copy(update={"name": "world"}), comm=comm)
    devices = _devices(world, comm)
    replicated = comm.allgather((world.state["sim_time"], world.state["staleness"], world.state["model"]))
    same_everywhere = all(all(np.array_equal(a, b) for a, b in zip(r, replicated[0])) for r in replicated)
    facts = None
    if comm.Get_rank() == 0:
        single = run_in_process(job.model_copy(update={"name": "self"}), comm=MPI.COMM_SELF)
        alone = single.strategy.extra_state()
        facts = (
            sorted(alone) == sorted(devices) and len(alone) == job.data.num_clients,
            max(float(np.abs(alone[k] - devices[k]).max()) for k in alone),
            float(np.abs(single.state["sim_time"] - world.state["sim_time"]).max()),
            np.array_equal(single.state["staleness"], world.state["staleness"]),
            abs(single.result.test_accuracy - world.result.test_accuracy),
        )
        print(f"hadfl {schedule}: 1 vs {comm.Get_size()} ranks, device models {facts[1]:.3g}")
    same_keys, diff, clock, staleness, acc = comm.bcast(facts, root=0)
    assert same_everywhere
    assert same_keys
    assert diff <= 1e-6, diff
    assert clock == 0.0 and staleness
    assert acc <= 1e-9, acc


@pytest.mark.parametrize("options", [[], OPTIONS, PAPER], ids=["defaults", "options", "paper"])
def test_resume_on_n_ranks_equals_uninterrupted(options):
    """Resumed at cycle 3: with OPTIONS the next cycle (rnd 3) is a full average."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-hadfl-")
    job6 = load_job(JOB, [f"out={tmp}", *BASE, "rounds=6", "checkpoint_every=3", "eval_every=3", *options])
    straight = run_in_process(job6.model_copy(update={"name": "straight"}), comm=comm)
    run_in_process(job6.model_copy(update={"name": "parts", "rounds": 3}), comm=comm)
    comm.Barrier()  # rank 0 writes the checkpoint; the others must not look for it before
    resumed = run_in_process(job6.model_copy(update={"name": "parts"}), resume=True, comm=comm)
    a, b = _devices(straight, comm), _devices(resumed, comm)
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert sorted(a) == sorted(b) and diff <= 1e-6, diff
    assert resumed.state["sim_time"][0] == straight.state["sim_time"][0] == 6 * 1.0  # 8 steps at 8/s
    comm.Barrier()  # the log is complete on disk before any rank reads it
    assert_resume_matches(
        straight, resumed, tmp, ("sim_time", "bytes_up", "train_loss", "test_accuracy"), rounds=6
    )
