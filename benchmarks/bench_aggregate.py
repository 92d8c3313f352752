"""The round's collective against a raw mpi4py ``Allreduce`` of the same number of bytes.

hpcfed's round reduces one packed float64 buffer: the summed client values, their weights (one per
element when clients train overlapping slices, as in SuperFed and PriSM), the metric sums and the
stop flag. Measured here: what the engine does per round around that buffer (zero it, add a rank's
summed update and weights into it, one in-place ``Allreduce``, the views the server step reads),
against ``comm.Allreduce(MPI.IN_PLACE, buf)`` on a preallocated float64 buffer of the same length,
and, for scale, against a float32 Allreduce of just the model (what a hand-written FedAvg with
scalar weights sends: 2x fewer bytes for float64, 4x fewer with per-element weights).

    mpirun -n 2 python benchmarks/bench_aggregate.py [--out benchmarks/results/aggregate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcfed.algorithms.base import BASE_METRICS
from hpcfed.comm import PackedAllreduce

SIZES = (10_000, 100_000, 1_000_000, 4_000_000)  # model parameters


def engine_round(packed: PackedAllreduce, update: np.ndarray, weight) -> tuple[np.ndarray, np.ndarray]:
    """What the engine does around the round's buffer (runner.py steps 3-5), for one rank."""
    packed.zero()
    np.add(packed.view("value"), update, out=packed.view("value"))
    np.add(packed.view("weight"), weight, out=packed.view("weight"))
    for m in BASE_METRICS:
        packed.view(m)[0] += 1.0
    total = packed.allreduce()
    return total["value"], total["weight"]


def timed(fn, comm, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, ranks aligned by a barrier each time."""
    fn()  # warm-up: first-touch pages, MPI's buffers
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    # the slowest rank sets the round's pace
    return comm.allreduce(statistics.median(times), op=MPI.MAX)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aggregate.json")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    for p in SIZES:
        for per_element in (False, True):
            layout = {
                "value": p,
                "weight": p if per_element else 1,
                **{m: 1 for m in BASE_METRICS},
                "stop": 1,
            }
            packed = PackedAllreduce(comm, layout)
            update = np.random.default_rng(comm.Get_rank()).normal(size=p)
            weight = np.ones(p) if per_element else 3.0

            raw = np.zeros(packed.buffer.size)
            model32 = np.zeros(p, np.float32)
            t_engine = timed(partial(engine_round, packed, update, weight), comm, args.repeats)
            t_raw = timed(partial(comm.Allreduce, MPI.IN_PLACE, raw, op=MPI.SUM), comm, args.repeats)
            t_32 = timed(partial(comm.Allreduce, MPI.IN_PLACE, model32, op=MPI.SUM), comm, args.repeats)
            rows.append(
                {
                    "params": p,
                    "per_element_weights": per_element,
                    "buffer_bytes": packed.buffer.nbytes,
                    "engine_s": t_engine,
                    "raw_same_bytes_s": t_raw,
                    "raw_float32_model_s": t_32,
                    "ratio_vs_same_bytes": t_engine / t_raw,
                    "ratio_vs_float32_model": t_engine / t_32,
                }
            )
            if comm.Get_rank() == 0:
                r = rows[-1]
                print(
                    f"P={p:>9,} per-element={per_element!s:5}  engine {t_engine * 1e3:8.3f} ms  "
                    f"raw same bytes {t_raw * 1e3:8.3f} ms ({r['ratio_vs_same_bytes']:.2f}x)  "
                    f"raw f32 model {t_32 * 1e3:8.3f} ms ({r['ratio_vs_float32_model']:.2f}x)",
                    flush=True,
                )
    if comm.Get_rank() == 0:
        out = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "mpi": MPI.Get_library_version(),
            },
            "ranks": comm.Get_size(),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
