"""The ``hpcfed`` command: argument parsing, exit codes and error messages (interface.md).

Exit codes: 0 done (also after a stop signal, checkpointed); 2 the user's input is wrong, with one
line on stderr naming the key or file; 1 anything else (a bug, often in user code: its traceback).
``run`` and ``resume`` are the Python API's (hpcfed.api), which makes every rank of an mpirun
leave together: the rank that failed reports, the others exit with the same code in silence.
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
    c = sub.add_parser("check", help="validate a job without training: keys, references, data, one batch")
    c.add_argument("job")
    c.add_argument("overrides", nargs="*", metavar="key=value")
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
        elif args.command == "check":
            from hpcfed.check import check_job

            report = check_job(args.job, args.overrides)  # on every rank; no collective
            from hpcfed.comm import world

            if world().Get_rank() == 0:
                print(report)
        elif args.command == "rundir":
            from hpcfed.config import load_job

            print(load_job(args.job, args.overrides).run_dir)
        return 0
    except UserError as exc:
        print(f"hpcfed: error: {exc}", file=sys.stderr)
        return 2


def _train(args) -> int:
    """``run`` / ``resume`` through the Python API; its exceptions become exit codes. Every rank
    of an mpirun raises at the same point (hpcfed.api), and only the reporting rank prints."""
    from hpcfed import api
    from hpcfed.errors import RankFailed, StorageError

    try:
        if args.command == "run":
            result = api.run(args.job, args.overrides)
        else:
            result = api.resume(args.run_dir, args.overrides)
    except UserError as exc:
        print(f"hpcfed: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except StorageError as exc:  # the disk, not the input: one line naming the file, exit 1
        print(f"hpcfed: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except RankFailed as exc:  # another rank reported the error
        return exc.exit_code
    except KeyboardInterrupt:
        print("hpcfed: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:  # noqa: BLE001 - a bug (often in user code): its traceback, once
        print(traceback.format_exc().rstrip(), file=sys.stderr, flush=True)
        return 1
    from hpcfed.comm import world

    if world().Get_rank() == 0:
        from hpcfed.info import describe

        if result.stopped_by:
            print(f"hpcfed: stopped by {result.stopped_by} after round {result.rounds_done}, checkpointed.")
            print(f"hpcfed: resume with: hpcfed resume {result.run_dir}")
        print(describe(result.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
