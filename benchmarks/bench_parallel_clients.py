"""Clients trained at once (train.parallel_clients) against a plain PyTorch loop and one at a time.

Per workload, in one process, alternating A/B/C each repeat: hpcfed's whole round with
``parallel_clients = "auto"``, the same with ``1`` (one client after another), and the fastest
honest sequential loop written by hand (one model, the global state loaded by ``copy_``, plain SGD
steps ``p -= lr * grad``, no optimiser object, the weighted sum accumulated in place), all on the
same clients, cohorts and batch orders. hpcfed's figure is its whole round (cohort, placement,
codec bytes, the packed collective, the server step, the log); evaluation only after the last.

Workloads (benchmarks.md):
  digits-10     digits FedAvg, 100 clients, 10 a round, MLP 64-128-10, 1 epoch, batch 10
  digits-100    the same clients each split in ten (1,000 clients), 100 a round
  synthetic-1000  LEAF Synthetic(1,1), 1,000 clients, all 1,000 a round, logistic regression
  cnn-10        digits with the CNN (auto must not be slower than 1)

Also the peak memory of a group against its size (digits MLP). Runs unchanged on a GPU node
(``device = "auto"`` picks ``cuda:0``; the plain loop runs on the same device).

    python benchmarks/bench_parallel_clients.py [--rounds 30] [--repeats 3] [--only digits-10 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hpcfed  # noqa: E402
from hpcfed.comm import choose_device, world  # noqa: E402
from hpcfed.data import load_federated  # noqa: E402
from hpcfed.io.metrics import read_metrics  # noqa: E402
from hpcfed.models import build_model  # noqa: E402
from hpcfed.rng import cohort, torch_generator  # noqa: E402
from hpcfed.runner import Run  # noqa: E402

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "jobs" / "quickstart.toml"


def digits_split(seed: int, pieces: int = 10):
    """A user dataset (``data.dataset = "bench_parallel_clients:digits_split"``): each of the
    digits job's 100 Dirichlet clients cut into ``pieces`` clients (benchmarks.md's 1,000)."""
    job = hpcfed.load_job(QUICKSTART, [f"seed={seed}"])
    base = load_federated(job.data, seed)
    clients = []
    for cid in range(base.num_clients):
        x, y = base.client(cid)
        for part in np.array_split(np.arange(len(y)), pieces):
            clients.append((x[part], y[part]))
    return hpcfed.FederatedData.from_clients(clients, test=base.test)


WORKLOADS = {
    "digits-10": [],
    "digits-100": [
        'data.dataset="bench_parallel_clients:digits_split"',
        "data.partition=natural",
        "data.num_clients=1000",
        "clients_per_round=100",
        f'job_dir="{HERE}"',
    ],
    "synthetic-1000": [
        "data.dataset=synthetic",
        "data.partition=natural",
        "data.num_clients=1000",
        "clients_per_round=1000",
        "model.hidden=[]",
    ],
    "cnn-10": ["model.name=cnn", "data.partition=iid"],
}


def plain_loop(job, data, rounds: int, device) -> float:
    """Seconds per round of the fastest honest hand-written sequential FedAvg."""
    torch.manual_seed(job.seed)
    model = build_model(job.model, data.input_shape, data.num_classes).to(device)
    params = list(model.parameters())
    global_params = [p.detach().clone() for p in params]
    sums = [torch.zeros_like(p) for p in params]
    lr, bs = job.train.lr, job.train.batch_size
    clients = {}

    def one_round(rnd: int) -> None:
        total = 0.0
        for s in sums:
            s.zero_()
        for cid in cohort(job.seed, rnd, data.num_clients, job.clients_per_round):
            if cid not in clients:
                x, y = data.client(int(cid))
                clients[cid] = (x.to(device), y.to(device))
            x, y = clients[cid]
            with torch.no_grad():
                for p, g in zip(params, global_params):
                    p.copy_(g)
            gen = torch_generator(job.seed, "train", rnd, int(cid))
            for _ in range(job.train.epochs):
                order = torch.randperm(x.shape[0], generator=gen).to(device)
                for s in range(0, x.shape[0], bs):
                    idx = order[s : s + bs]
                    for p in params:
                        p.grad = None
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    with torch.no_grad():
                        for p in params:
                            p.add_(p.grad, alpha=-lr)
            n = float(y.shape[0])
            total += n
            with torch.no_grad():
                for s, p in zip(sums, params):
                    s.add_(p, alpha=n)
        with torch.no_grad():
            for g, s in zip(global_params, sums):
                g.copy_(s / total)

    one_round(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for rnd in range(1, rounds + 1):
        one_round(rnd)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / rounds


def hpcfed_round(job, rounds: int, parallel) -> tuple[float, float]:
    """(seconds per round, final accuracy) of hpcfed's whole loop, warm-up round excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        job = job.model_copy(update={"rounds": rounds + 1, "out": tmp, "checkpoint_every": 10**6})
        job.train.parallel_clients = parallel
        run = Run(job, world(), job.run_dir, progress=False)
        run.create_files()
        result = run.loop()
        wall = read_metrics(job.run_dir / "log.h5")[1]["wall_time"]
        return float(wall[-1] - wall[0]) / rounds, result.test_accuracy


def group_memory(job, data, sizes) -> list[dict]:
    """Peak resident memory growth while training one group of k clients (a fresh process each
    would be cleaner; ru_maxrss only grows, so sizes go up and each row reports the growth)."""
    from hpcfed.executor import FusedMLP
    from hpcfed.flat import FlatModel
    from hpcfed.train import LocalSGD

    torch.manual_seed(0)
    flat = FlatModel(build_model(job.model, data.input_shape, data.num_classes))
    fused = FusedMLP.build(flat, LocalSGD(flat.module, job.train))
    rows = []
    for k in sizes:
        clients = []
        for i in range(k):
            x, y = data.client(i % data.num_clients)
            clients.append((x, y, torch_generator(0, "train", 0, i), None))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        fused.train(flat.vector.detach().clone(), clients)
        rows.append(
            {
                "clients_at_once": k,
                "seconds": time.perf_counter() - t,
                "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "parallel_clients.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))  # digits_split, for the digits-100 job
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "rounds": args.rounds,
        "workloads": {},
    }
    for name in args.only:
        job = hpcfed.load_job(QUICKSTART, [f"eval_every={10**6}", *WORKLOADS[name]])
        data = load_federated(job.data, job.seed)
        device = choose_device(job.device)
        rounds = max(3, args.rounds // 10) if name == "synthetic-1000" else args.rounds
        times = {"plain": [], "auto": [], "one": []}
        accs = {}
        for _ in range(args.repeats):  # alternating, so load on the machine hits all alike
            times["plain"].append(plain_loop(job, data, rounds, device))
            t, accs["auto"] = hpcfed_round(job, rounds, "auto")
            times["auto"].append(t)
            t, accs["one"] = hpcfed_round(job, rounds, 1)
            times["one"].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "ms_per_round": {k: 1e3 * v for k, v in med.items()},
            "auto_vs_plain": med["plain"] / med["auto"],
            "auto_vs_one": med["one"] / med["auto"],
            "one_vs_plain": med["plain"] / med["one"],
            "accuracy_auto": accs["auto"],
            "accuracy_one": accs["one"],
        }
        results["workloads"][name] = row
        print(
            f"{name:>15}: plain {row['ms_per_round']['plain']:8.2f} ms  "
            f"one {row['ms_per_round']['one']:8.2f} ms  auto {row['ms_per_round']['auto']:8.2f} ms  "
            f"| auto {row['auto_vs_plain']:.2f}x plain, "
            f"{row['auto_vs_one']:.2f}x one  | acc auto {accs['auto']:.4f} one {accs['one']:.4f}",
            flush=True,
        )
    job = hpcfed.load_job(QUICKSTART, [])
    results["group_memory"] = group_memory(job, load_federated(job.data, job.seed), [1, 10, 100, 1000])
    for r in results["group_memory"]:
        print(
            f"  {r['clients_at_once']:>5} clients at once: +{r['peak_growth_mb']:.1f} MB peak, "
            f"{r['seconds']:.3f} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
