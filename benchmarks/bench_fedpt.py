"""FedPT measurements (docs/fedpt.md): a client step with a frozen layer, and the digits runs.

``step``: one local SGD step of the standard EMNIST CNN (28x28, 62 classes, batch 20), all
parameters trainable against fc1 frozen the way FedPT freezes it (``requires_grad_(False)`` and
out of the optimiser): median time per step, bytes of gradients, of optimiser state (momentum 0.9)
and of the tensors autograd saves for backward (counted with ``saved_tensors_hooks``).

``digits``: the digits MLP job (jobs/fedavg_digits.toml) with FedAvg and with FedPT
``freeze = "largest"``: a client-lr sweep without DP, then DP-FedAvg against DP-FedPT at the same
sigma and S over three seeds. Final test accuracy, bytes up per round and epsilon.

    python benchmarks/bench_fedpt.py step [--steps 50] [--repeats 5]
    python benchmarks/bench_fedpt.py digits [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
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
from hpcfed.io.metrics import read_metrics  # noqa: E402
from hpcfed.models.cnn import build_cnn  # noqa: E402
from hpcfed.runner import Run  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "jobs" / "fedavg_digits.toml"
FEDPT = ["algorithm=fedpt", 'fedpt.freeze="largest"']


# --------------------------------------------------------------------------- one client step


def step_cost(frozen: bool, steps: int, batch: int = 20) -> dict:
    torch.manual_seed(0)
    model = build_cnn((1, 28, 28), 62)
    for p in model.fc1.parameters():
        p.requires_grad_(not frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 62, (batch,), generator=g)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def one_step(count_saved: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        if count_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    model.train()
    one_step(count_saved=True)  # warm-up (first step imports torch._dynamo), and saved bytes
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    per_step = (time.perf_counter() - t0) / steps
    grads = sum(p.grad.numel() * 4 for p in params if p.grad is not None)
    opt_state = sum(t.numel() * 4 for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "trainable_params": sum(p.numel() for p in params),
        "seconds_per_step": per_step,
        "grad_bytes": grads,
        "optimizer_state_bytes": opt_state,
        "saved_for_backward_bytes": saved[0],
    }


def bench_step(args) -> dict:
    runs = {"all": [], "fc1_frozen": []}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        runs["all"].append(step_cost(False, args.steps))
        runs["fc1_frozen"].append(step_cost(True, args.steps))
    out = {}
    for name, rs in runs.items():
        out[name] = {**rs[0], "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs)}
    a, f = out["all"], out["fc1_frozen"]
    print(
        f"{'':12s} {'trainable':>10s} {'ms/step':>8s} {'grads MB':>9s} {'momentum MB':>12s} {'saved MB':>9s}"
    )
    for name, r in out.items():
        print(
            f"{name:12s} {r['trainable_params']:>10,d} {1e3 * r['seconds_per_step']:>8.2f} "
            f"{r['grad_bytes'] / 1e6:>9.2f} {r['optimizer_state_bytes'] / 1e6:>12.2f} "
            f"{r['saved_for_backward_bytes'] / 1e6:>9.2f}"
        )
    print(f"step time ratio all/frozen: {a['seconds_per_step'] / f['seconds_per_step']:.2f}")
    return out


# --------------------------------------------------------------------------- digits runs


def run_digits(tmp: Path, name: str, overrides: list[str]) -> dict:
    job = load_job(DIGITS, [f"out={tmp}", f"name={name}", *overrides])
    run = Run(job, world(), job.run_dir, progress=False)
    run.create_files()
    run.loop()
    m = read_metrics(job.run_dir / "log.h5")[1]
    acc = m["test_accuracy"][~np.isnan(m["test_accuracy"])]
    row = {
        "overrides": overrides,
        "final_accuracy": float(acc[-1]),
        "bytes_up_per_round": int(m["bytes_up"][0]),
        "bytes_up_total": int(m["bytes_up"].sum()),
    }
    if "epsilon" in m:
        row["epsilon"] = float(m["epsilon"][-1])
        row["clipped_fraction"] = float(m["clipped_updates"].mean() / job.clients_per_round)
    return row


def bench_digits(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-fedpt-"))
    out: dict = {"lr_sweep": [], "dp": []}
    n = 0
    print("no DP, seed 0: final test accuracy after 50 rounds")
    for lr in (0.05, 0.1, 0.2, 0.5, 1.0):
        pair = {}
        for alg, extra in (("fedavg", []), ("fedpt", FEDPT)):
            n += 1
            pair[alg] = run_digits(tmp, f"r{n}", [*extra, f"train.lr={lr}"])
        out["lr_sweep"].append({"lr": lr, **pair})
        fa, pt = pair["fedavg"], pair["fedpt"]
        ratio = fa["bytes_up_total"] / pt["bytes_up_total"]
        accs = f"fedavg {fa['final_accuracy']:.4f}  fedpt {pt['final_accuracy']:.4f}"
        print(f"  lr {lr:<5} {accs}  bytes {ratio:.2f}x")
    print("DP (lr 0.5, delta 1e-5): final test accuracy, seeds 0 1 2")
    for sigma, clip in ((1.0, 0.2), (1.0, 0.5), (1.0, 1.0), (0.5, 0.5)):
        entry: dict = {"noise_multiplier": sigma, "clip": clip}
        for alg, extra in (("fedavg", []), ("fedpt", FEDPT)):
            rows = []
            for seed in (0, 1, 2):
                n += 1
                dp = [f"dp.clip={clip}", f"dp.noise_multiplier={sigma}", "train.lr=0.5", f"seed={seed}"]
                rows.append(run_digits(tmp, f"r{n}", [*extra, *dp]))
            entry[alg] = rows
        out["dp"].append(entry)
        fa = [r["final_accuracy"] for r in entry["fedavg"]]
        pt = [r["final_accuracy"] for r in entry["fedpt"]]
        print(
            f"  sigma {sigma} S {clip}: eps {entry['fedavg'][0]['epsilon']:.2f}  "
            f"fedavg {' '.join(f'{a:.3f}' for a in fa)} (mean {np.mean(fa):.3f})  "
            f"fedpt {' '.join(f'{a:.3f}' for a in pt)} (mean {np.mean(pt):.3f})"
        )
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["step", "digits"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = bench_step(args) if args.what == "step" else bench_digits(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
