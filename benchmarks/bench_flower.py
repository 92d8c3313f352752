"""hpcfed against Flower's simulation, end to end, on the digits FedAvg workload (benchmarks.md).

Both are whole processes started from the shell, timed from launch to exit, with the peak of the
summed resident memory of the whole process tree (Ray starts a GCS server, a raylet and workers;
psutil samples the tree every 20 ms). hpcfed runs on one process, as Flower runs one actor.

Flower lives in its own virtualenv, made on first use (``--flower-venv``; pip, CPU torch pinned
like the Makefile's). The workload Flower runs is exported from hpcfed (partitions, test set,
initial weights, cohorts, batch-order seeds: ``flower_digits.py``), so both train the same clients
in the same order from the same model; the benchmark checks that their accuracies agree.

    python benchmarks/bench_flower.py [--repeats 3] [--out benchmarks/results/flower.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _proc import run_tree

HERE = Path(__file__).resolve().parent
JOB = HERE.parent / "jobs" / "quickstart.toml"
TORCH = "torch==2.13.0"


def ensure_flower(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import flwr, ray"], capture_output=True).returncode == 0
    ):
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    if subprocess.run([*pip, "flwr[simulation]"]).returncode != 0:
        # benchmarks.md: some flwr releases pin a certifi the registry does not serve; take flwr's
        # requirements with the nearest certifi, then flwr itself without dependencies
        subprocess.run([*pip, "certifi", "ray", "grpcio", "protobuf", "cryptography", "typer"], check=True)
        subprocess.run([*pip, "--no-deps", "flwr"], check=True)
    return python


def export_workload(path: Path, job) -> None:
    """Everything Flower needs to run hpcfed's exact workload, as plain arrays."""
    import torch

    from hpcfed.data import load_federated
    from hpcfed.models import build_model
    from hpcfed.rng import cohort, torch_generator

    data = load_federated(job.data, job.seed)
    torch.manual_seed(job.seed)  # as hpcfed's Run does before building the model
    init = [
        p.detach().numpy() for p in build_model(job.model, data.input_shape, data.num_classes).parameters()
    ]
    xs, ys, starts = [], [], [0]
    x_train_parts = []
    for cid in range(data.num_clients):
        x, y = data.client(cid)
        x_train_parts.append(x.numpy())
        ys.append(y.numpy())
        starts.append(starts[-1] + x.shape[0])
    xs = np.concatenate(x_train_parts)
    cohorts = np.stack(
        [cohort(job.seed, r, data.num_clients, job.clients_per_round) for r in range(job.rounds)]
    )
    seeds = np.array(
        [
            [torch_generator(job.seed, "train", r, int(c)).initial_seed() for c in row]
            for r, row in enumerate(cohorts)
        ]
    )
    x_test, y_test = data.test
    np.savez(
        path,
        x_train=xs,
        y_train=np.concatenate(ys),
        client_start=np.array(starts),
        x_test=x_test.numpy(),
        y_test=y_test.numpy(),
        cohorts=cohorts,
        batch_seeds=seeds,
        num_clients=data.num_clients,
        lr=job.train.lr,
        batch=job.train.batch_size,
        epochs=job.train.epochs,
        eval_every=job.eval_every,
        hidden=job.model.hidden[0],
        **{f"init_{i}": a for i, a in enumerate(init)},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flower-venv", type=Path, default=Path.home() / ".cache" / "hpcfed-bench" / "flwr-venv")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "flower.json")
    args = ap.parse_args()

    from hpcfed.config import load_job
    from hpcfed.io.metrics import read_metrics

    flower_python = ensure_flower(args.flower_venv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="hpcfed-bench-flower-"))
    job = load_job(JOB)
    workload = tmp / "workload.npz"
    export_workload(workload, job)

    results: dict[str, list] = {"hpcfed": [], "flower": []}
    accuracy: dict[str, dict] = {}
    for i in range(args.repeats):
        out = tmp / f"hpcfed-{i}"
        cmd = [sys.executable, "-m", "hpcfed", "run", str(JOB), f"out={out}"]
        wall, peak, proc = run_tree(cmd, env)
        if proc.returncode:
            sys.exit(f"hpcfed failed: {proc.stderr}")
        cols = read_metrics(out / job.name / "log.h5")[1]
        evaluated = ~np.isnan(cols["test_accuracy"])
        accuracy["hpcfed"] = {
            int(r) + 1: float(a) for r, a in zip(cols["round"][evaluated], cols["test_accuracy"][evaluated])
        }
        results["hpcfed"].append({"wall_s": wall, "peak_bytes": peak})

        flower_out = tmp / f"flower-{i}.json"
        cmd = [str(flower_python), str(HERE / "flower_digits.py"), str(workload), str(flower_out)]
        wall, peak, proc = run_tree(cmd, env)
        if proc.returncode:
            sys.exit(f"flower failed: {proc.stderr[-3000:]}")
        accuracy["flower"] = {int(k): v for k, v in json.loads(flower_out.read_text())["accuracy"].items()}
        results["flower"].append({"wall_s": wall, "peak_bytes": peak})
        print(f"repeat {i}: hpcfed {results['hpcfed'][-1]}  flower {results['flower'][-1]}", flush=True)

    med = {
        system: {m: statistics.median([run[m] for run in runs]) for m in ("wall_s", "peak_bytes")}
        for system, runs in results.items()
    }
    # Flower's evaluate_fn here computes accuracy in float32: equal to 1e-6, not bit for bit
    same = accuracy["hpcfed"].keys() == accuracy["flower"].keys() and all(
        abs(accuracy["hpcfed"][r] - accuracy["flower"][r]) < 1e-6 for r in accuracy["hpcfed"]
    )
    summary = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "workload": "digits FedAvg (jobs/quickstart.toml): 100 clients, 10 per round, 50 rounds, MLP",
        "runs": results,
        "median": med,
        "speedup_wall": med["flower"]["wall_s"] / med["hpcfed"]["wall_s"],
        "memory_ratio": med["hpcfed"]["peak_bytes"] / med["flower"]["peak_bytes"],
        "accuracy": accuracy,
        "same_accuracy_every_eval": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        json.dumps(
            {k: summary[k] for k in ("median", "speedup_wall", "memory_ratio", "same_accuracy_every_eval")}
        )
    )


if __name__ == "__main__":
    main()
