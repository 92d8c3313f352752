"""The baselines' claims at small scale, 3 seeds (#16; numbers in BENCHMARKS.md).

- FedProx (Li et al. 2020): on LEAF Synthetic(1, 1) with 90 % stragglers, mu > 0 converges more
  stably and more accurately than mu = 0 (jobs/fedprox_synthetic.toml).
- SCAFFOLD (Karimireddy et al. 2020): under strong label skew with several local epochs it reaches
  a target accuracy in fewer rounds than FedAvg (jobs/scaffold_digits.toml; also Dirichlet 0.1
  and IID, where it should not matter).
- FedNova (Wang et al. 2020): with heterogeneous local steps it beats FedAvg
  (jobs/fednova_digits.toml; also without stragglers, and IID).
- FedAdagrad / FedYogi / FedAdam (Reddi et al. 2021) against FedAvg on the digits workload, each
  over a small server-lr grid, as the paper tunes them.

Every run goes through hpcfed.run (one process, one thread). Writes JSON and prints tables:

    python benchmarks/bench_baselines.py [--seeds 0 1 2] [--only fedprox scaffold ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import hpcfed  # noqa: E402
from hpcfed.io.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def run(job: str, overrides: list[str], out: Path) -> dict[str, np.ndarray]:
    name = "-".join(o.replace("=", "").replace(".", "").replace('"', "") for o in overrides) or "base"
    result = hpcfed.run(JOBS / job, [f"out={out}", f"name={name[:120]}", *overrides], progress=False)
    return read_metrics(result.log_path)[1]


def rounds_to(acc: np.ndarray, target: float) -> float:
    hit = np.flatnonzero(np.nan_to_num(acc, nan=-1.0) >= target)
    return float(hit[0] + 1) if hit.size else float("nan")


FEDPROX_VARIANTS = {
    # the paper's FedAvg baseline: stragglers' work is dropped (they never report)
    "fedavg-drops-stragglers": ["fedprox.mu=0", "faults.slow_prob=0", "faults.drop_prob=0.9"],
    "mu=0": ["fedprox.mu=0"],  # partial work kept, no proximal term
    "mu=0.1": ["fedprox.mu=0.1"],
    "mu=1": ["fedprox.mu=1.0"],
}


def fedprox(seeds, out):
    rows = []
    for mu, keys in FEDPROX_VARIANTS.items():
        for seed in seeds:
            m = run("fedprox_synthetic.toml", [*keys, f"seed={seed}"], out)
            acc = m["test_accuracy"][np.isfinite(m["test_accuracy"])]
            loss = m["train_loss"]
            rows.append(
                {
                    "mu": mu,
                    "seed": seed,
                    "final_accuracy": float(acc[-1]),
                    "last5_mean": float(acc[-5:].mean()),
                    "test_loss_final": float(m["test_loss"][np.isfinite(m["test_loss"])][-1]),
                    # stability: how much the evaluated accuracy falls back between evaluations
                    "accuracy_drops": float(np.clip(-np.diff(acc), 0, None).sum()),
                    "train_loss_std_last20": float(loss[-20:].std()),
                }
            )
    return rows


def against_fedavg(job: str, algorithm: str, settings: dict, measure, seeds, out) -> list[dict]:
    """Every setting x (FedAvg, the baseline) x seed: one row of ``measure(metrics)`` each."""
    rows = []
    for setting, keys in settings.items():
        for name in ("fedavg", algorithm):
            for seed in seeds:
                m = run(job, [f"algorithm={name}", f"seed={seed}", *keys], out)
                rows.append({"setting": setting, "algorithm": name, "seed": seed, **measure(m)})
    return rows


def scaffold(seeds, out):
    settings = {
        "classes2": ["data.partition=classes", "data.classes_per_client=2"],
        "classes1": ["data.partition=classes", "data.classes_per_client=1", "rounds=150"],
        "dirichlet0.1": ["data.partition=dirichlet", "data.alpha=0.1"],
        "iid": ["data.partition=iid"],
    }

    def measure(m):
        acc = m["test_accuracy"]
        return {
            "rounds_to_0.80": rounds_to(acc, 0.80),
            "rounds_to_0.90": rounds_to(acc, 0.90),
            "final_accuracy": float(acc[-1]),
            "bytes_per_round": float(m["bytes_up"].mean() + m["bytes_down"].mean()),
        }

    return against_fedavg("scaffold_digits.toml", "scaffold", settings, measure, seeds, out)


def fednova(seeds, out):
    settings = {
        "dirichlet0.5+stragglers": [],
        "dirichlet0.5": ["faults.slow_prob=0.0"],
        "dirichlet0.1+stragglers": ["data.alpha=0.1"],
        "iid+stragglers": ["data.partition=iid"],
        "dirichlet0.5+stragglers+momentum0.9": ["train.momentum=0.9", "train.lr=0.01"],
    }

    def measure(m):
        acc = m["test_accuracy"][np.isfinite(m["test_accuracy"])]
        return {
            "final_accuracy": float(acc[-1]),
            "last3_mean": float(acc[-3:].mean()),
            "test_loss_final": float(m["test_loss"][-1]),
        }

    return against_fedavg("fednova_digits.toml", "fednova", settings, measure, seeds, out)


def adaptive(seeds, out):
    rows = []
    for optimizer in ("sgd", "adam", "adagrad", "yogi"):
        grid = (1.0,) if optimizer == "sgd" else (0.01, 0.03, 0.1)
        for lr in grid:
            for seed in seeds:
                keys = [f"fedavg.server_optimizer={optimizer}", f"fedavg.server_lr={lr}", f"seed={seed}"]
                m = run("fedadagrad_digits.toml", keys, out)
                acc = m["test_accuracy"][np.isfinite(m["test_accuracy"])]
                rows.append(
                    {
                        "optimizer": optimizer,
                        "server_lr": lr,
                        "seed": seed,
                        "final_accuracy": float(acc[-1]),
                        "rounds_to_0.90": rounds_to(m["test_accuracy"], 0.90),
                    }
                )
    return rows


def summarise(rows, keys, values):
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    lines = []
    for group, rs in groups.items():
        cells = []
        for v in values:
            xs = np.array([r[v] for r in rs], dtype=float)
            cells.append(
                f"{v} {np.nanmean(xs):.3f} ± {np.nanstd(xs):.3f}"
                + (f" (nan {np.isnan(xs).sum()})" if np.isnan(xs).any() else "")
            )
        lines.append("  " + " ".join(f"{k}={g}" for k, g in zip(keys, group)) + ": " + "; ".join(cells))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=["fedprox", "scaffold", "fednova", "adaptive"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "baselines.json"))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            results[name] = globals()[name](args.seeds, Path(tmp) / name)
            print(name, flush=True)
            if name == "fedprox":
                print(
                    summarise(
                        results[name],
                        ["mu"],
                        ["final_accuracy", "last5_mean", "accuracy_drops", "train_loss_std_last20"],
                    )
                )
            elif name == "scaffold":
                print(
                    summarise(
                        results[name],
                        ["setting", "algorithm"],
                        ["rounds_to_0.80", "rounds_to_0.90", "final_accuracy"],
                    )
                )
            elif name == "fednova":
                print(summarise(results[name], ["setting", "algorithm"], ["final_accuracy", "last3_mean"]))
            else:
                print(
                    summarise(results[name], ["optimizer", "server_lr"], ["final_accuracy", "rounds_to_0.90"])
                )
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
