"""Compression in FedAvg: bytes up/down and accuracy of [compress] settings against plain FedAvg.

The digits FedAvg workload (jobs/quickstart.toml), one process, each variant in the same run.

    python benchmarks/bench_compress.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from hpcfed.comm import world  # noqa: E402
from hpcfed.config import load_job  # noqa: E402
from hpcfed.io.metrics import read_metrics  # noqa: E402
from hpcfed.runner import Run  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.toml"
TOPK4 = ["compress.sparsity=0.99", "compress.quantization=uniform", "compress.bits=4"]
VARIANTS = {
    "fedavg": [],
    "topk1%+4bit+EF": [*TOPK4, "compress.error_feedback=true"],
    "topk1%+4bit": TOPK4,
    "topk1%+4bit+EF stochastic": [*TOPK4, "compress.error_feedback=true", "compress.rounding=stochastic"],
    "fedavg server_lr=2": ["fedavg.server_lr=2.0"],
    "topk1%+4bit+EF server_lr=2": [*TOPK4, "compress.error_feedback=true", "fedavg.server_lr=2.0"],
    "topk1%+4bit+EF both directions server_lr=2": [
        *TOPK4,
        "compress.error_feedback=true",
        "compress.direction=both",
        "fedavg.server_lr=2.0",
    ],
    "topk1%+4bit+EF 100 rounds": [*TOPK4, "compress.error_feedback=true", "rounds=100"],
    # FedAvgM: server momentum accumulates the sparse averaged updates across rounds
    **{f"fedavgm seed={s}": ["fedavg.server_momentum=0.9", f"seed={s}"] for s in range(3)},
    **{
        f"topk1%+4bit+EF fedavgm seed={s}": [
            *TOPK4,
            "compress.error_feedback=true",
            "fedavg.server_momentum=0.9",
            f"seed={s}",
        ]
        for s in range(3)
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            job = load_job(JOB, [f"out={tmp}", f"name=v{i}", *overrides])
            run = Run(job, world(), job.run_dir, progress=False)
            run.create_files()
            result = run.loop()
            cols = read_metrics(job.run_dir / "log.h5")[1]
            rows.append(
                {
                    "variant": name,
                    "rounds": job.rounds,
                    "bytes_up": int(cols["bytes_up"].sum()),
                    "bytes_down": int(cols["bytes_down"].sum()),
                    "accuracy": result.test_accuracy,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
