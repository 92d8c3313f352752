"""FedPT measurements (docs/fedpt.md): a client step with a frozen layer, and the digits runs.

``step``: one local SGD step of the standard EMNIST CNN (28x28, 62 classes, batch 20), all
parameters trainable against fc1 frozen the way FedPT freezes it (``requires_grad_(False)`` and
out of the optimiser): median time per step, bytes of gradients, of optimiser state (momentum 0.9)
and of the tensors autograd saves for backward (counted with ``saved_tensors_hooks``).

``digits``: the digits MLP job (jobs/fedavg_digits.toml) with FedAvg and with FedPT
``freeze = "largest"``: a client-lr sweep without DP, then DP-FedAvg against DP-FedPT at the same
sigma and S. Every setting on IID, Dirichlet 0.5 and Dirichlet 0.1, seeds 0, 1, 2: client-lr sweeps
of FedAvg and of FedPT with ``lr_scale = 1`` (the paper's plain reading), both at the default keys
(FedPT's ``lr_scale = "auto"``), each at its best lr, and DP-FedAvg against DP-FedPT over a grid of
sigma and S (with the quantiles of the update norms DP clips). Final test accuracy, bytes, epsilon.

``init``: FedPT with the frozen layer initialised at a larger scale, against the lr sweep.
``heads``: ``lr_scale = "auto"`` on other heads (a wider frozen layer, two frozen layers).

    python benchmarks/bench_fedpt.py step [--steps 50] [--repeats 5]
    python benchmarks/bench_fedpt.py digits [--out FILE.json] [--plot FILE.png]
    python benchmarks/bench_fedpt.py init [--out FILE.json]
    python benchmarks/bench_fedpt.py heads [--out FILE.json]
    python benchmarks/bench_fedpt.py tables --out FILE.json      # docs/fedpt.md's tables from a digits JSON
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

from hpcfed.algorithms.dp import DifferentialPrivacy  # noqa: E402
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

PARTITIONS = {"iid": ["data.partition=iid"], "dir0.5": ["data.alpha=0.5"], "dir0.1": ["data.alpha=0.1"]}
SEEDS = (0, 1, 2)
PLAIN = [*FEDPT, "fedpt.lr_scale=1.0"]  # the paper's plain reading: FedAvg's client lr
LRS = {"fedavg": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0), "fedpt": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 16.0, 64.0)}
DP_LR = 0.5  # both algorithms' client lr under DP (FedAvg's best without DP; fedpt's "auto" is x1 there)
DP_GRID = {"noise_multiplier": (2.0, 1.0, 0.5), "clip": (0.1, 0.2, 0.3, 0.5, 1.0)}


class NormRecorder:
    """Records the L2 norm of every update DP clips (before clipping), to relate S to the norms."""

    def __init__(self):
        self.norms: list[float] = []
        self._clip = DifferentialPrivacy.clip

    def __enter__(self):
        recorder = self

        def clip(dp, update):
            u = np.asarray(update, dtype=np.float64)
            recorder.norms.append(float(np.sqrt(u @ u)))
            return recorder._clip(dp, update)

        DifferentialPrivacy.clip = clip
        return self

    def __exit__(self, *exc):
        DifferentialPrivacy.clip = self._clip


def run_digits(tmp: Path, name: str, overrides: list[str]) -> dict:
    job = load_job(DIGITS, [f"out={tmp}", f"name={name}", *overrides])
    with NormRecorder() as rec:
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
        "client_lr": run.strategy.trainer.cfg.lr,
    }
    if "epsilon" in m:
        row["epsilon"] = float(m["epsilon"][-1])
        row["clipped_fraction"] = float(m["clipped_updates"].mean() / job.clients_per_round)
        row["update_norm_q10_50_90"] = np.quantile(rec.norms, [0.1, 0.5, 0.9]).tolist()
    return row


class Sweep:
    """Runs one setting on every partition x seed, numbering the run folders."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-fedpt-"))
        self.n = 0

    def cell(self, overrides: list[str]) -> dict:
        """{partition: [row per seed]}"""
        out = {}
        for part, extra in PARTITIONS.items():
            out[part] = []
            for seed in SEEDS:
                self.n += 1
                out[part].append(run_digits(self.tmp, f"r{self.n}", [*overrides, *extra, f"seed={seed}"]))
        return out


def accuracies(cell: dict, part: str) -> list[float]:
    return [r["final_accuracy"] for r in cell[part]]


def mean_acc(cell: dict, part: str) -> float:
    return float(np.mean(accuracies(cell, part)))


def show(label: str, cell: dict) -> None:
    parts = "  ".join(f"{p} {' '.join(f'{a:.3f}' for a in accuracies(cell, p))}" for p in PARTITIONS)
    print(f"  {label:34s} {parts}", flush=True)


def bench_digits(args) -> dict:
    sweep = Sweep()
    out: dict = {"partitions": list(PARTITIONS), "seeds": list(SEEDS), "lr_sweep": {}, "dp": []}
    print("no DP: final test accuracy after 50 rounds, per partition: seeds 0 1 2")
    for alg, extra in (("fedavg", []), ("fedpt", PLAIN)):
        out["lr_sweep"][alg] = []
        for lr in LRS[alg]:
            cell = sweep.cell([*extra, f"train.lr={lr}"])
            out["lr_sweep"][alg].append({"lr": lr, "runs": cell})
            show(f"{alg}{' (lr_scale 1)' if extra else ''} lr {lr}", cell)
    # (a) the default keys: FedAvg as in config.py, FedPT with lr_scale "auto"
    out["default"] = {"fedavg": sweep.cell([]), "fedpt": sweep.cell(FEDPT)}
    for alg, cell in out["default"].items():
        show(f"default keys: {alg}", cell)
    # (b) each at its best lr of the sweep, per partition (mean over the seeds)
    out["tuned"] = {}
    for alg, rows in out["lr_sweep"].items():
        out["tuned"][alg] = {}
        for part in PARTITIONS:
            best = max(rows, key=lambda r: mean_acc(r["runs"], part))
            out["tuned"][alg][part] = {"lr": best["lr"], "runs": best["runs"][part]}
    print("DP: final test accuracy, per partition: seeds 0 1 2 (client lr 0.5, delta 1e-5)")
    for sigma in DP_GRID["noise_multiplier"]:
        for clip in DP_GRID["clip"]:
            entry: dict = {"noise_multiplier": sigma, "clip": clip}
            dp = [f"dp.clip={clip}", f"dp.noise_multiplier={sigma}", f"train.lr={DP_LR}"]
            for alg, extra in (("fedavg", []), ("fedpt", FEDPT)):
                entry[alg] = sweep.cell([*extra, *dp])
                eps = entry[alg]["iid"][0]["epsilon"]
                show(f"sigma {sigma} S {clip} eps {eps:.2f} {alg}", entry[alg])
            out["dp"].append(entry)
    # why lr_scale "auto" is 1 under DP: DP-FedPT at a larger client lr, sigma 1
    out["dp_fedpt_lr_scale"] = []
    for scale in (4.0, 20.0):
        for clip in DP_GRID["clip"]:
            dp = [f"dp.clip={clip}", "dp.noise_multiplier=1.0", f"train.lr={DP_LR}"]
            cell = sweep.cell([*FEDPT, *dp, f"fedpt.lr_scale={scale}"])
            out["dp_fedpt_lr_scale"].append({"lr_scale": scale, "clip": clip, "fedpt": cell})
            show(f"sigma 1.0 S {clip} fedpt lr_scale {scale}", cell)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)
    return out


def plot(out: dict, path: Path) -> None:
    """Accuracy against client lr (no DP) and against S at each sigma (DP), mean and seed range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted({e["noise_multiplier"] for e in out["dp"]}, reverse=True)
    fig, axes = plt.subplots(1, 1 + len(sigmas), figsize=(4.2 * (1 + len(sigmas)), 3.6), sharey=True)
    styles = {"iid": "-", "dir0.5": "--", "dir0.1": ":"}
    colours = {"fedavg": "tab:blue", "fedpt": "tab:red"}

    def band(ax, xs, cells, alg, part):
        accs = np.array([accuracies(c, part) for c in cells])
        label = f"{alg} {part}"
        ax.plot(xs, accs.mean(1), styles[part], color=colours[alg], marker="o", ms=3, label=label)
        ax.fill_between(xs, accs.min(1), accs.max(1), color=colours[alg], alpha=0.08)

    ax = axes[0]
    for alg, rows in out["lr_sweep"].items():
        for part in out["partitions"]:
            band(ax, [r["lr"] for r in rows], [r["runs"] for r in rows], alg, part)
    ax.set(xscale="log", xlabel="client lr (fedpt: lr_scale 1)", ylabel="test accuracy, 50 rounds")
    ax.set_title("no DP (fedpt 'auto' = lr 0.05 x 40 = 2)", fontsize=9)
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=6, ncol=2)
    for ax, sigma in zip(axes[1:], sigmas):
        rows = [e for e in out["dp"] if e["noise_multiplier"] == sigma]
        eps = rows[0]["fedavg"]["iid"][0]["epsilon"]
        for alg in ("fedavg", "fedpt"):
            for part in out["partitions"]:
                band(ax, [e["clip"] for e in rows], [e[alg] for e in rows], alg, part)
        ax.set(xscale="log", xlabel="clip S")
        ax.set_title(f"DP sigma {sigma} (eps {eps:.1f}), client lr {DP_LR}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_init(args) -> dict:
    """The frozen layer at a larger initial scale c (weights and bias x c): ReLU is positively
    homogeneous, so the features are the same up to the factor c, and a step on the head's weights
    acts like a step at lr x c^2. Is a better-scaled frozen init more than an lr change?"""
    from hpcfed.models import mlp

    build = mlp.MLP.__init__
    scale = [1.0]

    def scaled(self, *a, **k):
        build(self, *a, **k)
        with torch.no_grad():
            for layer in self.hidden:
                layer.weight.mul_(scale[0])
                layer.bias.mul_(scale[0])

    sweep, out = Sweep(), []
    mlp.MLP.__init__ = scaled
    try:
        for c, lr in ((6**0.5, 0.05), (20**0.5, 0.05), (6**0.5, 1 / 3)):
            scale[0] = c
            cell = sweep.cell([*PLAIN, f"train.lr={lr}"])
            out.append({"init_scale": c, "lr": lr, "lr_times_c2": lr * c * c, "runs": cell})
            show(f"frozen init x{c:.2f}, lr {lr:.3f} (~lr {lr * c * c:.2f})", cell)
    finally:
        mlp.MLP.__init__ = build
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


def bench_heads(args) -> dict:
    """Does "auto" (x40) carry over to other heads on frozen layers? A wider frozen layer and two
    frozen layers, at the default keys: FedAvg, FedPT at lr_scale 1 and at "auto"."""
    sweep, out = Sweep(), []
    models = {
        "64-512-10, hidden.0 frozen": (["model.hidden=[512]"], FEDPT),
        "64-128-128-10, both hidden frozen": (
            ["model.hidden=[128, 128]"],
            ["algorithm=fedpt", 'fedpt.freeze=["hidden.*"]'],
        ),
    }
    for label, (model, fedpt) in models.items():
        row = {"model": label}
        for name, extra in (
            ("fedavg", []),
            ("fedpt_lr_scale_1", [*fedpt, "fedpt.lr_scale=1.0"]),
            ("fedpt_auto", fedpt),
        ):
            row[name] = sweep.cell([*model, *extra])
            show(f"{label[:14]} {name}", row[name])
        out.append(row)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


def seeds_mean(accs: list[float]) -> str:
    return f"{' '.join(f'{a:.3f}' for a in accs)} ({np.mean(accs):.3f})"


def md(*cells, header: bool = False) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")
    if header:
        print("| --- " * len(cells) + "|")


def points(a: list[float], b: list[float]) -> str:
    return f"{100 * (np.mean(b) - np.mean(a)):+.1f}"


def tables(path: Path) -> None:
    """The markdown tables of docs/fedpt.md from a ``digits --out`` JSON."""
    out = json.loads(path.read_text())
    parts, default = out["partitions"], out["default"]
    fa, pt = (default[alg]["iid"][0]["bytes_up_per_round"] for alg in ("fedavg", "fedpt"))
    print(f"bytes up (= down) per round: fedavg {fa:,}  fedpt {pt:,}  ratio {fa / pt:.2f}x\n")
    md("partition", "FedAvg (lr 0.05)", "FedPT (auto: lr 2.0)", "FedPT - FedAvg", header=True)
    for p in parts:
        a, b = accuracies(default["fedavg"], p), accuracies(default["fedpt"], p)
        md(p, seeds_mean(a), seeds_mean(b), points(a, b))
    print()
    md("partition", "FedAvg, its best lr", "FedPT, its best lr (lr_scale 1)", "FedPT - FedAvg", header=True)
    for p in parts:
        ta, tb = out["tuned"]["fedavg"][p], out["tuned"]["fedpt"][p]
        a, b = ([r["final_accuracy"] for r in t["runs"]] for t in (ta, tb))
        md(p, f"lr {ta['lr']}: {seeds_mean(a)}", f"lr {tb['lr']}: {seeds_mean(b)}", points(a, b))
    print()
    algs = ("fedavg", "fedpt")
    md("client lr", *(f"{alg} {p}" for alg in algs for p in parts), header=True)
    by = {alg: {r["lr"]: r["runs"] for r in rows} for alg, rows in out["lr_sweep"].items()}
    for lr in sorted(set(by["fedavg"]) | set(by["fedpt"])):
        md(lr, *(f"{mean_acc(by[alg][lr], p):.3f}" if lr in by[alg] else "" for alg in algs for p in parts))
    print()
    md(
        "sigma",
        "eps",
        "S",
        "partition",
        "DP-FedAvg",
        "DP-FedPT",
        "FedPT - FedAvg",
        "clipped",
        "norms FedAvg",
        "norms FedPT",
        header=True,
    )
    for e in out["dp"]:
        for p in parts:
            a, b = accuracies(e["fedavg"], p), accuracies(e["fedpt"], p)
            clipped = " / ".join(f"{np.mean([r['clipped_fraction'] for r in e[alg][p]]):.2f}" for alg in algs)
            norms = [np.mean([r["update_norm_q10_50_90"] for r in e[alg][p]], axis=0) for alg in algs]
            q = [" / ".join(f"{x:.2f}" for x in n) for n in norms]
            eps = e["fedavg"][p][0]["epsilon"]
            md(
                e["noise_multiplier"],
                f"{eps:.2f}",
                e["clip"],
                p,
                seeds_mean(a),
                seeds_mean(b),
                points(a, b),
                clipped,
                *q,
            )
    print()
    md(
        "sigma",
        "eps",
        "partition",
        "DP-FedAvg, its best S",
        "DP-FedPT, its best S",
        "FedPT - FedAvg",
        header=True,
    )
    for sigma in sorted({e["noise_multiplier"] for e in out["dp"]}, reverse=True):
        rows = [e for e in out["dp"] if e["noise_multiplier"] == sigma]
        for p in parts:
            best = [max(rows, key=lambda e: mean_acc(e[alg], p)) for alg in algs]
            a, b = (accuracies(e[alg], p) for e, alg in zip(best, algs))
            eps = rows[0]["fedavg"][p][0]["epsilon"]
            md(
                sigma,
                f"{eps:.2f}",
                p,
                f"S {best[0]['clip']}: {seeds_mean(a)}",
                f"S {best[1]['clip']}: {seeds_mean(b)}",
                points(a, b),
            )
    print()
    base = {e["clip"]: e["fedpt"] for e in out["dp"] if e["noise_multiplier"] == 1.0}
    scaled = {(e["lr_scale"], e["clip"]): e["fedpt"] for e in out.get("dp_fedpt_lr_scale", [])}
    scales = sorted({k[0] for k in scaled})
    md("S", *(f"x{s:g} {p}" for s in (1.0, *scales) for p in parts), header=True)
    for clip, cell in base.items():
        cells = [cell, *(scaled[(s, clip)] for s in scales)]
        md(clip, *(f"{mean_acc(c, p):.3f}" for c in cells for p in parts))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["step", "digits", "init", "heads", "tables"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="digits: a PNG of the sweep")
    args = parser.parse_args(argv)
    if args.what == "tables":
        return tables(args.out)
    torch.set_num_threads(1)
    result = {"step": bench_step, "digits": bench_digits, "init": bench_init, "heads": bench_heads}[
        args.what
    ](args)
    if args.out and args.what == "step":
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
