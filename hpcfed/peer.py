"""The decentralized loop (HADFL, docs/hadfl.md): cycles on a simulated clock, no server step.

It reuses everything of :class:`hpcfed.runner.Run` but the round body: set-up, the packed
Allreduce, evaluation, the log, checkpoints and restore. A cycle is the strategy's
``run_cycle`` (local steps, point-to-point swaps, averages; its last Allreduce carries the metric
sums and the stop flag). At evaluation and checkpoint boundaries one more Allreduce forms the
data-weighted average of the device models, which is what is evaluated and written as the
checkpoint's ``model/``; the device models themselves go to ``clients/device.<d>`` and the clock,
staleness and speeds to ``server/``, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import time

import numpy as np

from hpcfed.runner import RunResult


def swap_models(comm, pairs, models: dict[int, np.ndarray], owner) -> dict[int, np.ndarray]:
    """For each of this rank's paired devices, its partner's model.

    Same-rank partners are looked up in memory; cross-rank ones arrive by non-blocking
    point-to-point calls (tag = the pair's index, unique per (source, dest)), all posted before one
    Waitall, so no ordering of the pairs can deadlock. Buffers are the contiguous float32 models.
    """
    rank = comm.Get_rank()
    received: dict[int, np.ndarray] = {}
    requests = []
    for tag, (a, b) in enumerate(pairs):
        for me, peer in ((a, b), (b, a)):
            if owner(me) != rank:
                continue
            if owner(peer) == rank:
                received[me] = models[peer]
                continue
            buf = np.empty_like(models[me])
            received[me] = buf
            requests.append(comm.Irecv(buf, source=owner(peer), tag=tag))
            requests.append(comm.Isend(np.ascontiguousarray(models[me]), dest=owner(peer), tag=tag))
    if requests:
        from mpi4py import MPI

        MPI.Request.Waitall(requests)
    return received


def peer_loop(run) -> RunResult:
    """:meth:`Run.loop` for a decentralized strategy (every rank runs it)."""
    job, strategy, packed = run.job, run.strategy, run.packed
    t0 = time.perf_counter() - run.wall_offset
    bar = run._progress_bar()
    accuracy = loss = float("nan")
    rnd = run.start_round
    for rnd in range(run.start_round, job.rounds):
        total = strategy.run_cycle(run.state, rnd, packed, stop=bool(run.stop))
        done = rnd + 1
        stopping = total["stop"][0] > 0
        evaluate = done % job.eval_every == 0 or done == job.rounds
        checkpoint = done % job.checkpoint_every == 0 or done == job.rounds or stopping
        if evaluate or checkpoint:
            run.state["model"] = strategy.average_model()
        test_acc, test_loss = run.evaluate() if evaluate else (float("nan"), float("nan"))
        accuracy, loss = (test_acc, test_loss) if evaluate else (accuracy, loss)
        wall = time.perf_counter() - t0
        if run.rank == 0:
            row = {
                "round": rnd,
                "test_accuracy": test_acc,
                "test_loss": test_loss,
                "train_loss": total["loss_sum"][0] / max(total["samples"][0], 1.0),
                "bytes_up": int(total["bytes_up"][0]),
                "bytes_down": 0,  # no server: every byte is peer to peer, counted in bytes_up
                "wall_time": wall,
                "sim_time": float(run.state["sim_time"][0]),
            }
            run.log.append(row, force=evaluate)
            run._report(bar, row, evaluate)
        if checkpoint:
            run.checkpoint(done, wall)
        if stopping:
            break
    return run.finish(bar, rnd, accuracy, loss)
