"""The ``hpcfed`` command: argument parsing, exit codes and error messages (interface.md).

Exit codes: 0 done (also after a stop signal, checkpointed); 2 the user's input is wrong, with one
line on stderr naming the key or file; 1 anything else. Under MPI an error on one rank must not
leave the others blocked in a collective: set-up errors are agreed on collectively (every rank
exits with the same code, rank 0 prints), and an error inside the round loop aborts the job.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

from hpcfed.config import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        print(f"hpcfed: error: {message} (see hpcfed --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hpcfed", description="Federated learning on HPC clusters (MPI, HDF5, SLURM).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a job: hpcfed run JOB.toml [key=value ...]")
    r.add_argument("job")
    r.add_argument("overrides", nargs="*", metavar="key=value")
    s = sub.add_parser("resume", help="continue a run from its newest valid checkpoint")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", metavar="rounds=N")
    i = sub.add_parser("info", help="summary of a run folder, log.h5 or checkpoint")
    i.add_argument("path")
    pl = sub.add_parser("plot", help="accuracy against round, bytes and simulated time")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("-o", "--output", default=None)
    e = sub.add_parser("export", help="SuperFed: one subnet of the family as a standalone checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--subnet", required=True, help="smallest | largest | a JSON spec")
    e.add_argument("-o", "--output", required=True, help="the checkpoint file to write (.h5)")
    b = sub.add_parser("bench", help="benchmarks: hpcfed bench kernels [--json]")
    b.add_argument("what", choices=["kernels"])
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    b.add_argument("--repeats", type=int, default=5)
    d = sub.add_parser("rundir", help="print the run folder a job would use ({out}/{name})")
    d.add_argument("job")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.formatwarning = lambda msg, *a, **k: f"hpcfed: warning: {msg}\n"
    try:
        if args.command in ("run", "resume"):
            return _train(args)
        if args.command == "info":
            from hpcfed.info import describe

            print(describe(Path(args.path)))
        elif args.command == "plot":
            from hpcfed.io.plots import plot_runs

            dirs = [Path(d) for d in args.run_dirs]
            out = Path(args.output) if args.output else dirs[0] / "plots" / "accuracy.png"
            print(plot_runs(dirs, out))
        elif args.command == "export":
            import json

            from hpcfed.export import export_subnet

            path, spec = export_subnet(Path(args.run_dir), args.subnet, Path(args.output))
            print(f"{path}  subnet {json.dumps(spec)}")
        elif args.command == "bench":
            import json

            from hpcfed.kernels.bench import format_table, run_kernel_benchmarks

            os.environ.setdefault("OMP_NUM_THREADS", "1")  # one-thread baselines (benchmarks.md)
            rows = run_kernel_benchmarks(sizes=args.sizes, repeats=args.repeats)
            print(json.dumps(rows, indent=1) if args.json else format_table(rows))
        elif args.command == "rundir":
            from hpcfed.config import load_job

            print(load_job(args.job, args.overrides).run_dir)
        return 0
    except UserError as exc:
        print(f"hpcfed: error: {exc}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from hpcfed.comm import world
    from hpcfed.signals import StopFlag

    # First thing: a stop signal during start-up (imports, data loading) must not kill a rank;
    # it is honoured at the first round boundary.
    stop = StopFlag().install()
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    if size > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # one rank per core; the launcher should also set OMP_NUM_THREADS=1

    # Set-up: every rank parses, loads data and builds the model; errors are agreed on at the end.
    run, error = None, None
    try:
        run = _setup(args, comm, stop)
    except UserError as exc:
        error = (2, str(exc))
    except Exception:  # noqa: BLE001 - reported below, on every rank that hit it
        error = (1, traceback.format_exc().rstrip())
    errors = comm.allgather(error) if size > 1 else [error]
    failed = [e for e in errors if e is not None]
    if failed:
        code, message = failed[0]
        if rank == 0:
            print(f"hpcfed: error: {message}" if code == 2 else message, file=sys.stderr)
        return code

    # The loop: an exception on one rank ends the whole job rather than hang the others.
    try:
        result = run.loop()
    except UserError as exc:
        return _abort(comm, 2, f"hpcfed: error: {exc}")
    except KeyboardInterrupt:
        return _abort(comm, 130, "hpcfed: interrupted")
    except Exception:  # noqa: BLE001
        return _abort(comm, 1, traceback.format_exc().rstrip())
    if rank == 0:
        from hpcfed.info import describe

        if result.stopped_by:
            print(f"hpcfed: stopped by {result.stopped_by} after round {result.rounds_done}, checkpointed.")
            print(f"hpcfed: resume with: hpcfed resume {result.run_dir}")
        print(describe(result.run_dir))
    return 0


def _setup(args, comm, stop):
    from hpcfed.config import load_job, parse_override, validate
    from hpcfed.io.checkpoint import load_latest
    from hpcfed.runner import Run, check_new_run_dir

    if args.command == "run":
        job = load_job(args.job, args.overrides)
        check_new_run_dir(job.run_dir, comm)
        run = Run(job, comm, job.run_dir, stop=stop)
        run.create_files()
        return run
    run_dir = Path(args.run_dir)
    config = run_dir / "config.toml"
    if not config.is_file():
        raise UserError(f"{config}: not found; is {run_dir} an hpcfed run folder?")
    from hpcfed.config import read_toml

    raw = read_toml(config)
    for text in args.overrides:
        path, value = parse_override(text)
        if path != ["rounds"]:
            raise UserError(f"override {text!r}: only rounds=N may change on resume")
        raw["rounds"] = value
    job = validate(raw, str(config))
    ckpt = load_latest(run_dir)
    run = Run(job, comm, run_dir, stop=stop)
    run.restore(ckpt)
    if comm.Get_rank() == 0 and args.overrides:
        from hpcfed.config import to_toml

        config.write_text(to_toml(job))
    return run


def _abort(comm, code: int, message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    if comm.Get_size() > 1:
        sys.stdout.flush()
        comm.Abort(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
