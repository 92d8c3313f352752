"""SuperFed against training each subnet alone (docs/superfed.md, BENCHMARKS.md).

One SuperFed run of jobs/superfed_digits.toml (elastic MLP, 20 clients, 8 a round, 100 rounds)
against k independent FedAvg runs of the same job, each training one fixed subnet
(``model.subnet``, the paper's iFedAvg), on the same data, cohorts and seed:

* k = 4: the family SuperFed evaluates by default (smallest, two middle, largest);
* k = 9: depth 1, 2, 3 × width ratio 0.25, 0.5, 1.0 (uniform over layers).

The SuperFed run evaluates the union of both lists (evaluation draws no randomness, so it does not
change training). Reported per subnet: final test accuracy of SuperFed's subnet and of FedAvg's;
per k: total bytes (up + down, the encoded messages, from the logs) and total training MACs
(3 × forward MACs per sample and epoch; SuperFed logs its own as ``train_macs``; a FedAvg run of
one subnet costs 3 × MACs × epochs × the samples of every round's cohort), and the ratios
independent / SuperFed (the paper: 9.43x compute and about 10.9x communication for k = 9).

    python benchmarks/bench_superfed.py [--seeds 0 1 2] [--rounds 100] [--jobs 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from hpcfed.config import _toml_value, load_job  # noqa: E402
from hpcfed.io.metrics import read_metrics  # noqa: E402
from hpcfed.models.elastic import elastic_space, spec_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "superfed_digits.toml"
RESULTS = ROOT / "benchmarks" / "results" / "superfed.json"


def families(job) -> tuple[list[dict], list[dict]]:
    space = elastic_space(job.model, job.superfed)
    grid = [space.uniform(d, r) for d in space.depths for r in (0.25, 0.5, 1.0)]
    return space.ladder(4), grid


def run_job(overrides: list[str]) -> dict:
    """Run the job with ``overrides`` in this process; its log's columns and family group."""
    import h5py

    from hpcfed.comm import world
    from hpcfed.runner import Run

    job = load_job(JOB, overrides)
    run = Run(job, world(), job.run_dir, progress=False)
    run.create_files()
    t0 = time.perf_counter()
    run.loop()
    cols = read_metrics(job.run_dir / "log.h5")[1]
    out = {"seconds": time.perf_counter() - t0, "metrics": {k: v.tolist() for k, v in cols.items()}}
    with h5py.File(job.run_dir / "log.h5", "r", locking=False) as f:
        if "family" in f:
            out["family"] = {
                "subnets": json.loads(f["family"].attrs["subnets"]),
                "accuracy": f["family"]["accuracy"][-1].tolist(),
            }
    return out


def cohort_samples(job, rounds: int) -> int:
    """Training samples of every round's cohort, summed (the same cohorts for every run)."""
    from hpcfed.data import load_federated
    from hpcfed.rng import cohort

    data = load_federated(job.data, job.seed)
    return int(
        sum(
            data.client_sizes[cohort(job.seed, r, data.num_clients, job.clients_per_round)].sum()
            for r in range(rounds)
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    base = load_job(JOB, [f"rounds={args.rounds}"])
    four, nine = families(base)
    subnets = four + [s for s in nine if s not in four]
    tmp = Path(tempfile.mkdtemp(prefix="bench-superfed-"))
    common = [f"rounds={args.rounds}", f"out={tmp}", "checkpoint_every=1000"]
    tasks = {}
    for seed in args.seeds:
        tasks[("superfed", seed)] = [
            *common,
            f"seed={seed}",
            f"name=superfed-{seed}",
            f"superfed.eval_subnets={_toml_value(subnets)}",
        ]
        for i, spec in enumerate(subnets):
            tasks[(spec_text(spec), seed)] = [
                *common,
                f"seed={seed}",
                f"name=fedavg-{i}-{seed}",
                "algorithm=fedavg",
                f"model.subnet={_toml_value(spec)}",
            ]
    print(f"{len(tasks)} runs of {args.rounds} rounds in {tmp}", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(run_job, ov) for key, ov in tasks.items()}
        done = {key: f.result() for key, f in futures.items()}

    epochs = base.train.epochs
    space = elastic_space(base.model, base.superfed)
    shape, classes = (64,), 10  # digits
    per_seed = {}
    for seed in args.seeds:
        sf = done[("superfed", seed)]
        samples = cohort_samples(load_job(JOB, [f"seed={seed}"]), args.rounds)
        row = {
            "superfed_bytes": int(np.sum(sf["metrics"]["bytes_up"]) + np.sum(sf["metrics"]["bytes_down"])),
            "superfed_macs": float(np.sum(sf["metrics"]["train_macs"])),
            "superfed_seconds": sf["seconds"],
            "subnets": {},
        }
        accs = dict(zip(map(spec_text, sf["family"]["subnets"]), sf["family"]["accuracy"]))
        for spec in subnets:
            fa = done[(spec_text(spec), seed)]
            m = fa["metrics"]
            row["subnets"][spec_text(spec)] = {
                "macs_forward": space.macs(spec, shape, classes),
                "params": space.params(spec, shape, classes),
                "superfed_accuracy": accs[spec_text(spec)],
                "fedavg_accuracy": m["test_accuracy"][-1],
                "fedavg_bytes": int(np.sum(m["bytes_up"]) + np.sum(m["bytes_down"])),
                "fedavg_macs": 3.0 * space.macs(spec, shape, classes) * epochs * samples,
            }
        per_seed[seed] = row

    summary = {"subnets": {}, "k": {}}
    for spec in subnets:
        key = spec_text(spec)
        sf = [per_seed[s]["subnets"][key]["superfed_accuracy"] for s in args.seeds]
        fa = [per_seed[s]["subnets"][key]["fedavg_accuracy"] for s in args.seeds]
        summary["subnets"][key] = {
            "macs_forward": per_seed[args.seeds[0]]["subnets"][key]["macs_forward"],
            "superfed_mean": statistics.mean(sf),
            "fedavg_mean": statistics.mean(fa),
            "superfed_sd": statistics.pstdev(sf),
            "fedavg_sd": statistics.pstdev(fa),
            "difference": statistics.mean(sf) - statistics.mean(fa),
        }
    for k, family in (("4", four), ("9", nine)):
        keys = [spec_text(s) for s in family]
        b = statistics.mean(sum(per_seed[s]["subnets"][c]["fedavg_bytes"] for c in keys) for s in args.seeds)
        m = statistics.mean(sum(per_seed[s]["subnets"][c]["fedavg_macs"] for c in keys) for s in args.seeds)
        sb = statistics.mean(per_seed[s]["superfed_bytes"] for s in args.seeds)
        sm = statistics.mean(per_seed[s]["superfed_macs"] for s in args.seeds)
        summary["k"][k] = {
            "subnets": keys,
            "independent_bytes": b,
            "superfed_bytes": sb,
            "bytes_ratio": b / sb,
            "independent_macs": m,
            "superfed_macs": sm,
            "macs_ratio": m / sm,
        }

    print(f"\n{'subnet':44s} {'MACs':>7s} {'SuperFed':>14s} {'FedAvg alone':>14s} {'diff':>6s}")
    for key, r in summary["subnets"].items():
        sf = f"{100 * r['superfed_mean']:.2f} ±{100 * r['superfed_sd']:.2f}"
        fa = f"{100 * r['fedavg_mean']:.2f} ±{100 * r['fedavg_sd']:.2f}"
        print(f"{key:44s} {r['macs_forward']:>7,d} {sf:>14s} {fa:>14s} {100 * r['difference']:>+6.2f}")
    for k, r in summary["k"].items():
        print(
            f"k = {k}: bytes {r['independent_bytes'] / 1e6:.1f} MB alone vs "
            f"{r['superfed_bytes'] / 1e6:.1f} MB "
            f"({r['bytes_ratio']:.2f}x); training MACs {r['independent_macs'] / 1e9:.2f} G vs "
            f"{r['superfed_macs'] / 1e9:.2f} G ({r['macs_ratio']:.2f}x)"
        )
    result = {
        "job": str(JOB.relative_to(ROOT)),
        "rounds": args.rounds,
        "seeds": args.seeds,
        "summary": summary,
        "per_seed": per_seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
