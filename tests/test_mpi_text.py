"""MPI suite: the Shakespeare jobs (TFF HDF5 and LEAF JSON, char_lstm) give the same model on
1 rank and on N ranks. Run under ``mpirun -n 2`` / ``-n 3`` with ``pytest --with-mpi -m mpi``.

The LEAF run starts on a cold index cache shared by every rank: the ranks index the files
together (a lock per file) and must end with the same clients.
"""

from __future__ import annotations

import pytest

from hpcfed.config import load_job

from . import text_layouts as layouts
from .conftest import ROOT, shared_tmp, world_vs_single

pytestmark = pytest.mark.mpi


def _tff_job(tmp):
    train, test = layouts.corpus_snippets(layouts.stdlib_corpus(6, max_lines=40))
    return (
        ROOT / "jobs" / "fedavg_shakespeare_tff.toml",
        [
            (tmp / "train.h5", lambda p: layouts.write_fed_shakespeare(p, train)),
            (tmp / "test.h5", lambda p: layouts.write_fed_shakespeare(p, test)),
        ],
        ["model.options.hidden_size=32"],
    )


def _leaf_job(tmp):
    train, test = layouts.shakespeare_users(layouts.stdlib_corpus(6, max_lines=6), test_every=3)
    return (
        ROOT / "jobs" / "fedavg_shakespeare_leaf.toml",
        [
            (tmp / "train", lambda p: layouts.write_leaf(p, train, 3, "train")),
            (tmp / "test", lambda p: layouts.write_leaf(p, test, 2, "test")),
        ],
        ['model.options={outputs="last", hidden_size=32}', f'data.options.index_cache="{tmp / "index"}"'],
    )


@pytest.mark.parametrize("make", [_tff_job, _leaf_job], ids=["tff", "leaf"])
def test_shakespeare_one_rank_equals_n_ranks(make):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = shared_tmp(comm, "hpcfed-mpi-text-")
    job_file, files, extra = make(tmp)
    if comm.Get_rank() == 0:
        for path, write in files:
            write(path)
    comm.Barrier()
    (train, _), (test, _) = files
    job = load_job(job_file, [
        f"out={tmp}", f'data.path="{train}"', f'data.test_path="{test}"', "rounds=3", "eval_every=1",
        "data.num_clients=6", "clients_per_round=4", "train.lr=2.0", *extra,
    ])  # fmt: skip
    replicated, diff, acc = world_vs_single(job, comm, tmp)
    if comm.Get_rank() == 0:
        print(
            f"{job.name}: {comm.Get_size()} ranks vs 1: max model difference {diff:.2e}, accuracy {acc:.1e}"
        )
    assert replicated
    assert diff <= 1e-6, diff
    assert acc <= 1e-9, acc
