"""The round loop: SPMD with a replicated server (architecture.md, principle 1).

Every rank runs this same loop. Each round: the cohort comes from (seed, round); each rank trains
its share of the cohort and sums the clients' additive updates; ONE Allreduce of one flat buffer
(updates, metric sums and the stop flag) gives every rank the same total; every rank applies the
same server step. Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpcfed import __version__, registry
from hpcfed.algorithms import Update, make_strategy
from hpcfed.comm import (
    PackedAllreduce,
    allreduce_sum,
    choose_device,
    raise_together,
    recv_arrays,
    send_arrays,
)
from hpcfed.config import JobConfig, UserError, to_toml
from hpcfed.data import load_federated
from hpcfed.executor import FusedMLP, GroupRun, group_size
from hpcfed.faults import FAULT_METRICS, Faults
from hpcfed.flat import FlatModel
from hpcfed.io import storage
from hpcfed.io.checkpoint import Checkpoint, save_checkpoint
from hpcfed.io.metrics import MetricsLog
from hpcfed.models import build_model
from hpcfed.placement import assign_groups, training_cost
from hpcfed.rng import cohort
from hpcfed.robust import RobustAggregation, is_finite
from hpcfed.signals import StopFlag
from hpcfed.train import evaluate_sums, job_loss, local_work


def job_references(job: JobConfig) -> dict[str, str]:
    """The job's references to code: built-in names or the user's "module:attribute" (registry)."""
    return {
        "model.name": job.model.name,
        "data.dataset": job.data.dataset,
        "train.loss": job.train.loss,
        "algorithm": job.algorithm,
    }


@dataclass
class RunResult:
    """What :func:`hpcfed.run` returns (the same on every rank)."""

    run_dir: Path
    rounds_done: int
    stopped_by: str | None  # "SIGTERM", ...: stopped early, checkpointed; None: ran to the end
    test_accuracy: float  # at the last evaluation (NaN for regression tasks)
    test_loss: float = float("nan")  # at the last evaluation

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.h5"

    @property
    def checkpoint(self) -> Path | None:
        """The newest checkpoint file (load its model with ``hpcfed.load_state_dict``)."""
        from hpcfed.io.checkpoint import list_checkpoints

        found = list_checkpoints(self.run_dir)
        return found[0] if found else None


class Run:
    """One job on one communicator: set-up, then :meth:`loop`."""

    def __init__(
        self, job: JobConfig, comm, run_dir: Path, progress: bool = True, stop: StopFlag | None = None
    ):
        self.job, self.comm, self.run_dir = job, comm, Path(run_dir)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.progress = progress and self.rank == 0
        self.device = choose_device(job.device)
        registry.add_search_path(job.job_dir)  # user modules beside the job file
        self.loss = job_loss(job.train)  # resolved before any data is read: a bad reference fails fast
        self.data = load_federated(job.data, job.seed)
        torch.manual_seed(job.seed)  # the initial model is the same on every rank
        module = build_model(job.model, self.data.input_shape, self.data.num_classes).to(self.device)
        self.flat = FlatModel(module)
        self.strategy = make_strategy(job, self.flat, self.data, self.device, comm)
        # clients trained at once, vectorised, where the model allows (train.parallel_clients)
        vectorise = job.train.parallel_clients != 1
        self.fused = FusedMLP.build(self.flat, self.strategy.trainer) if vectorise else None
        self.group_size = group_size(job.train.parallel_clients, self.fused, self.strategy.placement)
        self.user_code = registry.user_code(job_references(job))  # files and hashes, for checkpoints
        self.state = self.strategy.init_state()
        # [faults] and the engine's update checks (hpcfed/faults.py, hpcfed/robust.py); their counts
        # ride on the round's Allreduce
        self.faults = Faults(job.faults, job.seed)
        self.robust = RobustAggregation(job.robust, comm)
        counts = {name: 1 for name in ("rejected_updates", *FAULT_METRICS)}
        # "failed": a rank whose client code raised; every rank then leaves together (raise_together)
        self.packed = PackedAllreduce(comm, {**self.strategy.layout(), **counts, "stop": 1, "failed": 1})
        # this rank's contiguous shard of the test set: evaluation is split over ranks too
        x, y = self.data.test
        shard = np.array_split(np.arange(x.shape[0]), self.size)[self.rank]
        self.test_x, self.test_y = x[shard], y[shard]
        self.start_round, self.wall_offset = 0, 0.0
        self.log = MetricsLog(self.run_dir / "log.h5") if self.rank == 0 else None
        self.stop = stop if stop is not None else StopFlag().install()

    # -- files (rank 0) ---------------------------------------------------------------------------
    def attrs(self) -> dict:
        return {
            "algorithm": self.job.algorithm,
            "config": to_toml(self.job),
            "hpcfed_version": __version__,
            "world_size": self.size,
            "seed": self.job.seed,
        }

    def create_files(self) -> None:
        if self.rank == 0:
            # storage faults (hpcfed/io/storage.py): an `out` that cannot be created or written is
            # exit 2 naming it, a full disk or an I/O error one line (exit 1); files are written
            # whole or not at all, and what a killed run left half-written goes
            key = f"out = {self.job.out!r}"
            with storage.writing_run_folder(self.run_dir, "creating the run's files", key, fresh=True):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                storage.remove_stale_temps(self.run_dir)
                storage.replace_file(self.run_dir / "config.toml", to_toml(self.job).encode())
                self.log.create(self.attrs(), self.strategy.log_groups())

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint: server state, per-client state, the log cut back to it."""
        self.flat.module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpt.model.items()})
        self.state = {"model": self.flat.get(), **ckpt.groups.get("server", {})}
        self.strategy.load_extra_state(ckpt.groups.get("clients", {}))
        self.start_round = ckpt.round
        self.wall_offset = float(ckpt.attrs.get("wall_time", 0.0))
        if self.rank == 0:
            # storage faults (hpcfed/io/storage.py): a read-only run folder is exit 2, a full disk
            # one line (exit 1); what a killed run left half-written goes
            fix = "hpcfed resume needs a run folder it can write"
            doing = f"cutting the log back to round {ckpt.round}"
            with storage.writing_run_folder(self.run_dir, doing, str(self.run_dir), fix=fix):
                storage.remove_stale_temps(self.run_dir)
                try:
                    self.log.truncate(ckpt.round)
                except (KeyError, ValueError) as exc:  # torn or short log (a killed writer)
                    warnings.warn(
                        f"{self.log.path}: unusable ({exc}); rebuilt from {ckpt.path}", stacklevel=2
                    )
                    self.log.rebuild(self.attrs(), ckpt.groups.get("history", {}), self.strategy.log_groups())

    def checkpoint(self, rounds_done: int, wall: float) -> None:
        # Per-client state lives on the clients' home ranks. Every rank streams its arrays to rank 0
        # one at a time, which writes each into the file as it arrives: no rank ever holds every
        # client's state (ResFed: thousands of clients x several models), whatever the rank count.
        # Storage faults (hpcfed/io/storage.py): rank 0 alone writes, so every rank learns its
        # verdict in one tiny collective (raise_together) after the write: a write that failed for
        # lack of space is skipped once with a warning (retried at the next checkpoint), anything
        # else, a second failure in a row or a failed final checkpoint raises on every rank.
        clients = self.strategy.iter_extra_state()
        if self.rank != 0:
            send_arrays(self.comm, clients, dest=0)
            raise_together(self.comm, None)
            return
        others = [recv_arrays(self.comm, source=r) for r in range(1, self.size)]
        clients = itertools.chain(clients, *others)
        writes = self.__dict__.setdefault(
            "checkpoint_writes", storage.CheckpointWrites(self.run_dir, self.job)
        )
        failure, doing = None, "appending the log's rows before the checkpoint"
        try:
            self.log.flush(strict=True)
            doing = "writing the checkpoint"
            self.flat.set(self.state["model"])
            model = {k: v.numpy() for k, v in self.flat.state_dict().items()}
            groups = {
                "server": {k: v for k, v in self.state.items() if k != "model"},
                "clients": clients,
                "history": self.log.history(),
            }
            attrs = {**self.attrs(), "wall_time": wall, "user_code": json.dumps(self.user_code)}
            save_checkpoint(self.run_dir, rounds_done, attrs, model, groups, self.job.checkpoint_keep)
            writes.succeeded()
        except Exception as exc:  # noqa: BLE001 - agreed on by every rank below
            stopping = self.packed.buffer[self.packed.slices["stop"]][0] > 0  # the round's Allreduce
            failure = writes.failed(exc, doing, rounds_done, stopping)
            if failure is None:  # skipped: said on stderr and, at the next append, in the log
                self.log.note(rounds_done - 1, "checkpoint_skipped")
        for stream in others:  # what the other ranks still send after a failure: no sender waits
            for _ in stream:
                pass
        raise_together(self.comm, failure)

    # -- evaluation (all ranks) -----------------------------------------------------------------
    def evaluate(self) -> tuple[float, float]:
        """(test accuracy, test loss) of the global model; accuracy is NaN for regression."""
        self.flat.set(self.strategy.eval_vector(self.state))
        failure, sums = None, (0.0, 0.0, 0)
        try:  # the model is user code: a failure on one rank's shard must not strand the others
            sums = evaluate_sums(self.flat.module, self.test_x, self.test_y, loss=self.loss)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            failure = exc
        correct, loss_sum, count, failed = allreduce_sum(self.comm, np.array([*sums, failure is not None]))
        if failed:
            raise_together(self.comm, failure)
        return correct / count, loss_sum / count

    def evaluate_groups(self) -> dict[str, dict[str, np.ndarray]]:
        """The algorithm's further evaluations (e.g. SuperFed's family), summed over ranks."""
        sums = self.strategy.eval_sums(self.state, self.test_x, self.test_y)
        return self.strategy.eval_rows(allreduce_sum(self.comm, sums)) if sums.size else {}

    # -- the loop -----------------------------------------------------------------------------------
    def loop(self) -> RunResult:
        if getattr(self.strategy, "decentralized", False):  # HADFL: devices own models, no server
            from hpcfed.peer import peer_loop

            return peer_loop(self)
        job, strategy, packed = self.job, self.strategy, self.packed
        t0 = time.perf_counter() - self.wall_offset
        bar = self._progress_bar()
        accuracy = loss = float("nan")
        rnd = self.start_round
        for rnd in range(self.start_round, job.rounds):
            # 1. the cohort, from (seed, round): the same on every rank, no communication
            clients = cohort(job.seed, rnd, self.data.num_clients, job.clients_per_round)
            # 2. this rank's share, in groups trained at once: greedy by cost, or by fixed home rank
            costs = training_cost(self.data.client_sizes[clients], job.train.epochs, job.train.batch_size)
            groups = assign_groups(clients, costs, self.size, strategy.placement, self.group_size)[self.rank]
            # 3. train them and sum their additive updates into the round's buffer
            packed.zero()
            failure = None
            try:  # client code may be the user's: a failure leaves with every rank (step 4)
                strategy.begin_round(self.state, rnd)
                for group in groups:
                    self._group(group, rnd)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                failure = exc
            strategy.group = None
            packed.view("stop")[0] = 1.0 if self.stop else 0.0
            packed.view("failed")[0] = 1.0 if failure is not None else 0.0
            # 4. one Allreduce: updates, metric sums, the stop and failure flags together
            total = packed.allreduce()
            if total["failed"][0] > 0:
                raise_together(self.comm, failure)
            # 5. the same server step on every rank
            extras = {name: total[f"extra.{name}"] for name in strategy.extra_sums_sizes()}
            update = self.robust.combine(Update(total["value"], total["weight"], extras=extras))
            failed = total["dropped_clients"][0] + total["rejected_updates"][0]
            if failed < len(clients):  # a round in which every client failed keeps the model
                self.state = strategy.server_update(self.state, update, rnd)
            # 6. evaluate, log, checkpoint
            done = rnd + 1
            stopping = total["stop"][0] > 0
            evaluate = done % job.eval_every == 0 or done == job.rounds
            test_acc, test_loss = self.evaluate() if evaluate else (float("nan"), float("nan"))
            groups = self.evaluate_groups() if evaluate else {}
            accuracy, loss = (test_acc, test_loss) if evaluate else (accuracy, loss)
            wall = time.perf_counter() - t0
            if self.rank == 0:
                for name, values in groups.items():  # flushed with the row below
                    self.log.append_group(name, rnd, values)
                row = {
                    "round": rnd,
                    "test_accuracy": test_acc,
                    "test_loss": test_loss,
                    "train_loss": total["loss_sum"][0] / max(total["samples"][0], 1.0),
                    "bytes_up": int(total["bytes_up"][0]),
                    "bytes_down": int(total["bytes_down"][0]),
                    "wall_time": wall,
                    "sim_time": wall,
                }
                row.update({m: total[m][0] for m in strategy.extra_metrics})
                row["rejected_updates"] = int(total["rejected_updates"][0])
                if self.faults.active:
                    row.update({m: int(total[m][0]) for m in FAULT_METRICS})
                row.update(strategy.server_metrics(self.state, rnd))
                self.log.append(row, force=evaluate)
                self._report(bar, row, evaluate)
            # 7. a stop request on any rank stops every rank at this boundary, checkpointed
            if done % job.checkpoint_every == 0 or done == job.rounds or stopping:
                self.checkpoint(done, wall)
            if stopping:
                break
        return self.finish(bar, rnd, accuracy, loss)

    def close(self) -> None:
        """Whatever happened: the log's buffered rows reach the file (rank 0)."""
        if self.log is not None:
            self.log.flush()

    def finish(self, bar, last_round: int, accuracy: float, loss: float = float("nan")) -> RunResult:
        """After the loop (either loop): flush the log, close the bar, say why it stopped."""
        if self.rank == 0:
            self.log.flush()
            if bar is not None:
                bar.close()
        stopped = self.stop.received or (
            "signal on another rank" if last_round + 1 < self.job.rounds else None
        )
        return RunResult(self.run_dir, last_round + 1, stopped, accuracy, loss)

    def _group(self, group: list[int], rnd: int) -> None:
        """Train a group of clients: at once where the executor applies, else one by one."""
        if len(group) > 1 and self.fused is not None:
            fates = {cid: self.faults.fate(rnd, cid) for cid in group}
            live = [cid for cid in group if not fates[cid].dropped]
            self.strategy.group = GroupRun(self.fused, live, {cid: fates[cid].work for cid in live})
            # the whole group's sum in one pass, where nothing acts on single updates in between
            per_client = self.faults.cfg.nan_prob > 0 or self.robust.cfg.active or not live
            update = None if per_client else self.strategy.group_update(self.state, live, rnd)
            if update is not None:
                self.packed.view("dropped_clients")[0] += len(group) - len(live)
                self.packed.view("slow_clients")[0] += sum(fates[c].slow for c in live)
                self._add(update)
                self.strategy.group = None
                return
        for cid in group:
            self._client(cid, rnd)
        self.strategy.group = None

    def _client(self, cid: int, rnd: int) -> None:
        """Train one client as its [faults] fate says, and add its update to the round's buffer."""
        fate = self.faults.fate(rnd, cid)
        if fate.dropped:  # never trains, sends nor receives: its per-client state stays as it was
            self.packed.view("dropped_clients")[0] += 1
            return
        with local_work(fate.work):
            update = self.strategy.client_update(self.state, cid, rnd)
        self.packed.view("slow_clients")[0] += fate.slow
        if fate.corrupt:
            update.value = self.faults.corrupt(update.value, rnd, cid)
        self._accumulate(update, cid)

    def _accumulate(self, update: Update, cid: int) -> None:
        packed = self.packed
        if not is_finite(update):  # injected or diverged, any algorithm: never reaches the sums
            packed.view("rejected_updates")[0] += 1
            for name in ("bytes_up", "bytes_down"):  # its bytes were sent all the same
                packed.view(name)[0] += update.metrics.get(name, 0.0)
            return
        self._add(self.robust.admit(update, cid))

    def _add(self, update: Update) -> None:
        """An admitted update (one client's, or a group's sum) into the round's buffer."""
        packed = self.packed
        packed.add("value", update.value)
        packed.add("weight", update.weight)
        for name, value in update.metrics.items():
            packed.view(name)[0] += value
        for name, value in update.extras.items():
            packed.add(f"extra.{name}", value)

    def _progress_bar(self):
        if not (self.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.job.rounds, initial=self.start_round, unit="round", leave=False)

    def _report(self, bar, row: dict, evaluated: bool) -> None:
        if bar is not None:
            bar.update(1)
        if evaluated and self.progress:
            line = (
                f"round {row['round'] + 1:>5}/{self.job.rounds}  acc {row['test_accuracy']:.4f}  "
                f"loss {row['test_loss']:.4f}  train {row['train_loss']:.4f}  "
                f"up {row['bytes_up'] / 1e6:.2f} MB  down {row['bytes_down'] / 1e6:.2f} MB  "
                f"{row['wall_time']:.1f} s"
            )
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)


def check_new_run_dir(run_dir: Path, comm) -> None:
    """Refuse to overwrite a run: rank 0 looks, every rank learns the answer (one bcast)."""
    exists = None
    if comm.Get_rank() == 0:
        try:
            exists = (run_dir / "log.h5").exists()
        except OSError as exc:  # e.g. EACCES on a parent: said once, on every rank, not a hang
            exists = f"out = '{run_dir.parent}': cannot look into {run_dir} ({exc.strerror}); choose another"
    if comm.Get_size() > 1:
        exists = comm.bcast(exists, root=0)
    if isinstance(exists, str):
        raise UserError(exists)
    if exists:
        raise UserError(f"{run_dir}: already holds a run; use 'hpcfed resume {run_dir}' or another name/out")
