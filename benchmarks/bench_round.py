"""Round overhead: hpcfed's FedAvg round against a plain single-process PyTorch FedAvg loop.

Both run in this process on the same data, partition, cohorts and client batch orders (hpcfed's
own generators), one torch thread, after a warm-up round (the first optimiser step imports
torch._dynamo). The plain loop is what one writes by hand: load the global state_dict, a fresh
SGD optimiser per client, average the client models weighted by sample counts. hpcfed's figure is
its whole round loop: cohort, placement, codec bytes, the packed collective, the server step and
the log rows (buffered HDF5 appends).

    python benchmarks/bench_round.py [--rounds 200] [--repeats 3] [--out FILE.json]
    python benchmarks/bench_round.py --sweep 5 10 20 50 100 --plot FILE.png   # time vs cohort size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hpcfed.comm import world  # noqa: E402
from hpcfed.config import load_job  # noqa: E402
from hpcfed.data import load_federated  # noqa: E402
from hpcfed.models import build_model  # noqa: E402
from hpcfed.rng import cohort, torch_generator  # noqa: E402
from hpcfed.runner import Run  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.toml"


def plain_loop(job, data, rounds: int) -> tuple[float, np.ndarray]:
    """Seconds per round of the hand-written loop, and its final flat model."""
    torch.manual_seed(job.seed)
    model = build_model(job.model, data.input_shape, data.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    tc = job.train

    def one_round(rnd: int) -> None:
        nonlocal global_state
        total_n = 0.0
        acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for cid in cohort(job.seed, rnd, data.num_clients, job.clients_per_round):
            x, y = data.client(int(cid))
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum)
            gen = torch_generator(job.seed, "train", rnd, int(cid))
            model.train()
            for _ in range(tc.epochs):
                order = torch.randperm(x.shape[0], generator=gen)
                for s in range(0, x.shape[0], tc.batch_size):
                    idx = order[s : s + tc.batch_size]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            n = float(y.shape[0])
            total_n += n
            for k, v in model.state_dict().items():
                acc[k] += n * v
        global_state = {k: v / total_n for k, v in acc.items()}

    one_round(0)  # warm-up
    t = time.perf_counter()
    for rnd in range(1, rounds + 1):
        one_round(rnd)
    per_round = (time.perf_counter() - t) / rounds
    return per_round, torch.cat([v.reshape(-1) for v in global_state.values()]).numpy()


def hpcfed_loop(job, rounds: int) -> float:
    """Seconds per round of hpcfed's engine (set-up excluded, warm-up round excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        job = job.model_copy(update={"rounds": rounds + 1, "out": tmp, "checkpoint_every": 10**6})
        run = Run(job, world(), job.run_dir, progress=False)
        run.create_files()
        # time from the end of round 0 (warm-up) to the end of the last round, from the log
        run.loop()
        from hpcfed.io.metrics import read_metrics

        _, cols = read_metrics(job.run_dir / "log.h5")
        wall = cols["wall_time"]
        return float(wall[-1] - wall[0]) / rounds


def sweep(job, data, args) -> None:
    """Time per round against clients per round, both loops, medians of ``repeats``; JSON and a plot."""
    rows = []
    for k in args.sweep:
        kjob = job.model_copy(update={"clients_per_round": k})
        plain = statistics.median(plain_loop(kjob, data, args.rounds)[0] for _ in range(args.repeats))
        ours = statistics.median(hpcfed_loop(kjob, args.rounds) for _ in range(args.repeats))
        rows.append(
            {"clients_per_round": k, "plain_ms": 1e3 * plain, "hpcfed_ms": 1e3 * ours, "ratio": ours / plain}
        )
        print(
            f"{k:>4} clients/round: plain {1e3 * plain:7.2f} ms  "
            f"hpcfed {1e3 * ours:7.2f} ms  ({ours / plain:.2f}x)"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"benchmark": "round_sweep", "rounds": args.rounds, "rows": rows}, indent=2)
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = [r["clients_per_round"] for r in rows]
        ax.plot(ks, [r["plain_ms"] for r in rows], "o-", label="plain PyTorch loop")
        ax.plot(ks, [r["hpcfed_ms"] for r in rows], "s-", label="hpcfed (1 process)")
        ax.set_xlabel("clients per round")
        ax.set_ylabel("time per round (ms)")
        ax.set_title("digits FedAvg, MLP, 1 local epoch")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sweep", type=int, nargs="*", help="clients per round to sweep (default: the job's 10)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of time per round against clients per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # evaluation every round would time the test set, not the round: evaluate at the end only
    job = load_job(JOB, [f"eval_every={10**6}"])
    data = load_federated(job.data, job.seed)
    if args.sweep:
        sweep(job, data, args)
        return
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(job, data, args.rounds)[0])
        ours.append(hpcfed_loop(job, args.rounds))
    result = {
        "benchmark": "round_overhead",
        "workload": "digits FedAvg, 100 clients, 10/round, MLP 64-128-10, 1 epoch, batch 10",
        "rounds": args.rounds,
        "plain_ms_per_round": 1e3 * statistics.median(plain),
        "hpcfed_ms_per_round": 1e3 * statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(plain),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
