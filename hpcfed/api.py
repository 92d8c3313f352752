"""The Python API: ``hpcfed.run``, ``hpcfed.resume``, ``hpcfed.load_job`` (docs/api.md).

The ``hpcfed`` command is a thin layer over these. Every rank calls them, in a plain script or
one launched by ``mpirun -n N python script.py`` / ``srun``: same run folder, log, checkpoints and
stop signals as the command line. Failures leave every rank together:

- bad input raises :class:`hpcfed.UserError` (the CLI: one line, exit 2), on every rank;
- an exception in user code (a model, dataset, loss or strategy) is raised on the rank where it
  happened (the lowest such rank), and every other rank raises :class:`hpcfed.RankFailed`
  naming it, at the same point: no rank is left waiting in a collective, and nothing already
  written is lost. An exception the engine could not agree on across ranks (inside a
  point-to-point exchange, say) ends the job with ``MPI_Abort`` after printing its traceback,
  since the other ranks would otherwise wait forever.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from hpcfed.config import JobConfig, apply_overrides, parse_override, read_toml, to_toml, validate
from hpcfed.config import load_job as _load_job
from hpcfed.errors import UserError

__all__ = ["load_job", "resume", "run"]


def load_job(path: str | os.PathLike, overrides: Sequence[str] = ()) -> JobConfig:
    """The validated job of a TOML file with dotted ``key=value`` overrides (UserError if bad)."""
    return _load_job(path, list(overrides))


def _job(job: str | os.PathLike | JobConfig, overrides: Sequence[str]) -> JobConfig:
    if isinstance(job, JobConfig):
        if not overrides:
            return job
        raw = apply_overrides(job.model_dump(exclude_none=True), list(overrides))
        return validate(raw, "job (with overrides)")
    if isinstance(job, (str, os.PathLike)):
        return load_job(job, overrides)
    raise TypeError(f"hpcfed.run: job must be a path or a JobConfig, not {type(job).__name__}")


def run(
    job: str | os.PathLike | JobConfig, overrides: Sequence[str] = (), *, comm=None, progress: bool = True
):
    """Run a job (a TOML path or a :class:`JobConfig`) to the end or to a stop signal.

    ``comm`` is an mpi4py communicator (``MPI.COMM_WORLD`` by default; a sub-communicator runs
    the job on its ranks alone, its rank 0 writing). Returns a :class:`RunResult`."""

    def make(comm, stop):
        from hpcfed.runner import Run, check_new_run_dir

        cfg = _job(job, overrides)
        check_new_run_dir(cfg.run_dir, comm)
        instance = Run(cfg, comm, cfg.run_dir, progress=progress, stop=stop)
        instance.create_files()
        return instance

    return _execute(make, comm)


def resume(run_dir: str | os.PathLike, overrides: Sequence[str] = (), *, comm=None, progress: bool = True):
    """Continue a run from its newest valid checkpoint; ``rounds=N`` may extend it (nothing else
    may change). User code is imported again from the references in the run's ``config.toml``;
    a module whose source changed since the checkpoint is named in a warning."""

    def make(comm, stop):
        from hpcfed.io.checkpoint import load_latest
        from hpcfed.runner import Run

        folder = Path(run_dir)
        config = folder / "config.toml"
        if not config.is_file():
            raise UserError(f"{config}: not found; is {folder} an hpcfed run folder?")
        raw = read_toml(config)
        for text in overrides:
            path, value = parse_override(text)
            if path != ["rounds"]:
                raise UserError(f"override {text!r}: only rounds=N may change on resume")
            raw["rounds"] = value
        cfg = validate(raw, str(config))
        ckpt = load_latest(folder)
        instance = Run(cfg, comm, folder, progress=progress, stop=stop)
        instance.restore(ckpt)
        if comm.Get_rank() == 0:
            _warn_changed_code(ckpt, instance.user_code)
            if overrides:  # written whole or not at all; a failure is one line (hpcfed/io/storage.py)
                from hpcfed.io import storage

                fix = "hpcfed resume needs a run folder it can write"
                with storage.writing_run_folder(folder, "writing config.toml", str(folder), fix=fix):
                    storage.replace_file(config, to_toml(cfg).encode())
        return instance

    return _execute(make, comm)


def _warn_changed_code(ckpt, current: dict) -> None:
    from hpcfed.registry import changed_code

    recorded = json.loads(ckpt.attrs.get("user_code", "{}") or "{}")
    for what in changed_code(recorded, current):
        warnings.warn(
            f"{what} changed since {ckpt.path.name} was written; the resumed run uses the new source "
            "and may not continue the old one exactly",
            stacklevel=3,
        )


def _execute(make_run, comm):
    """Set up on every rank, agree on set-up errors and on the dataset, then run the loop."""
    from hpcfed.signals import StopFlag

    # First thing: a stop signal during start-up (imports, data loading) must not kill a rank;
    # it is honoured at the first round boundary.
    stop = StopFlag().install()
    try:
        from hpcfed.comm import agreed, raise_together, world

        comm = comm if comm is not None else world()
        size = comm.Get_size()
        if size > 1 and "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(1)  # one rank per core; the launcher should also set OMP_NUM_THREADS=1

        instance, failure = None, None
        try:
            instance = make_run(comm, stop)
            # a user dataset must be a pure function of its seed: ranks compare what they built
            digest = instance.data.fingerprint() if size > 1 else None
        except Exception as exc:  # noqa: BLE001 - agreed on below, raised on every rank
            failure, digest = exc, None
        digests = raise_together(comm, failure, digest)
        if len(set(digests)) > 1:
            from hpcfed.errors import RankFailed

            odd = next(r for r, d in enumerate(digests) if d != digests[0])
            if comm.Get_rank() != 0:  # rank 0 reports
                raise RankFailed(0, 2)
            raise UserError(
                f"data.dataset = {instance.job.data.dataset!r}: ranks 0 and {odd} built different datasets; "
                "a dataset must be a pure function of (seed, data.options): seed every random choice "
                "from the seed argument (docs/api.md)"
            )
        try:
            result = instance.loop()
            instance.close()
            # rank 0 may still be writing the last checkpoint: every rank returns once the run's
            # files are complete, so a script can read them (or resume) straight away
            if size > 1:
                comm.Barrier()
            return result
        except BaseException as exc:
            if size > 1 and not agreed(exc):
                # the other ranks cannot know: end the job rather than leave them waiting
                message = (
                    "hpcfed: interrupted" if isinstance(exc, KeyboardInterrupt) else traceback.format_exc()
                )
                if isinstance(exc, UserError):
                    message = f"hpcfed: error: {exc}"
                print(message.rstrip(), file=sys.stderr, flush=True)
                sys.stdout.flush()
                comm.Abort(
                    130 if isinstance(exc, KeyboardInterrupt) else 2 if isinstance(exc, UserError) else 1
                )
            raise
        finally:
            instance.close()
    finally:
        stop.restore()
