"""The round's collective against a raw mpi4py ``Allreduce`` of the same number of bytes.

hpcfed's round reduces one packed float64 buffer: the summed client values, their weights (one per
element when clients train overlapping slices, as in SuperFed and PriSM), the metric sums and the
stop flag. Three comparisons, 2 ranks, per model size, with and without per-element weights:

* collective: the engine's ``PackedAllreduce.allreduce()`` (one in-place Allreduce of the packed
  buffer and the named views the server step reads) against ``comm.Allreduce(MPI.IN_PLACE, buf)``
  on a preallocated float64 buffer of the same length;
* round: what the engine does around it (zero the buffer, add the rank's client update and
  weights, the metric sums, the collective) against the hand-written equivalent (add the update
  into a preallocated buffer, one Allreduce): the rank-local sum of client updates is work both do;
* unpacked: one Allreduce per field (value, weight, each metric, the stop flag), the design the
  packing replaces.

For scale, a float32 Allreduce of just the model (a FedAvg with scalar weights and float32 sums:
2x fewer bytes than float64, 4x fewer than float64 with per-element weights) is reported too.

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
    packed.add("value", update)
    packed.add("weight", weight)
    for m in BASE_METRICS:
        packed.view(m)[0] += 1.0
    total = packed.allreduce()
    return total["value"], total["weight"]


def raw_round(comm, buf: np.ndarray, update: np.ndarray) -> None:
    """The hand-written round: the rank's update summed into a preallocated buffer, one Allreduce."""
    np.add(buf[: update.size], update, out=buf[: update.size])
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def unpacked(comm, fields: list[np.ndarray]) -> None:
    """One Allreduce per field instead of one packed buffer."""
    for f in fields:
        comm.Allreduce(MPI.IN_PLACE, f, op=MPI.SUM)


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
            fields = [np.zeros(packed.slices[name].stop - packed.slices[name].start) for name in layout]
            allreduce = partial(comm.Allreduce, MPI.IN_PLACE, op=MPI.SUM)
            t = {
                "engine_collective": timed(packed.allreduce, comm, args.repeats),
                "raw_collective": timed(partial(allreduce, raw), comm, args.repeats),
                "engine_round": timed(partial(engine_round, packed, update, weight), comm, args.repeats),
                "raw_round": timed(partial(raw_round, comm, raw, update), comm, args.repeats),
                "unpacked": timed(partial(unpacked, comm, fields), comm, args.repeats),
                "float32_model": timed(partial(allreduce, model32), comm, args.repeats),
            }
            row = {"params": p, "per_element_weights": per_element, "buffer_bytes": packed.buffer.nbytes}
            row.update({f"{k}_s": v for k, v in t.items()})
            row["collective_ratio"] = t["engine_collective"] / t["raw_collective"]
            row["round_ratio"] = t["engine_round"] / t["raw_round"]
            row["unpacked_over_packed"] = t["unpacked"] / t["engine_collective"]
            row["round_over_float32_model"] = t["engine_round"] / t["float32_model"]
            rows.append(row)
            if comm.Get_rank() == 0:
                print(
                    f"P={p:>9,} per-element={per_element!s:5}  collective {row['collective_ratio']:.2f}x  "
                    f"round {row['round_ratio']:.2f}x  unpacked/packed {row['unpacked_over_packed']:.2f}x  "
                    f"round/f32-model {row['round_over_float32_model']:.2f}x  "
                    f"({t['engine_round'] * 1e3:.3f} ms)",
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
