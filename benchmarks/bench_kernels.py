"""Benchmark the compression kernels against NumPy and PyTorch in one run; write JSON.

    python benchmarks/bench_kernels.py [--sizes 1000000 10000000] [--repeats 5] [--out FILE] [--table]

Set OMP_NUM_THREADS=1 for one-thread baselines (benchmarks.md); the kernels are single-threaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from hpcfed.kernels.bench import format_table, run_kernel_benchmarks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write JSON here instead of stdout")
    ap.add_argument("--table", action="store_true", help="also print a table to stderr")
    args = ap.parse_args(argv)
    rows = run_kernel_benchmarks(sizes=args.sizes, repeats=args.repeats)
    doc = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
    }
    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.table:
        print(format_table(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
