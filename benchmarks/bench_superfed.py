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

    python benchmarks/bench_superfed.py [cost] [--seeds 0 1 2] [--rounds 100] [--jobs 1] [--out FILE.json]

Issue 19 (label skew; docs/superfed.md "Under label skew"):

    python benchmarks/bench_superfed.py sweep [--settings default tuned] [--partitions iid dir0.5 dir0.1]
        [--variants defaults paper ...] [--seeds 0 1 2] [--rounds 100] [--jobs 2] [--no-baseline]
    python benchmarks/bench_superfed.py diagnose    # who trains the smallest/largest subnet (no training)
    python benchmarks/bench_superfed.py plot        # benchmarks/results/superfed_sweep.png
    python benchmarks/bench_superfed.py table [--ablations ...]   # the docs' markdown tables

``sweep``: per setting (``tuned``: the job; ``default``: its [train] and [superfed] keys back to
hpcfed's defaults), partition and seed, SuperFed in each variant (VARIANTS: overrides, "paper"
the paper's reading of every option) against each of the 4 tracked subnets alone with FedAvg;
results accumulate in ``benchmarks/results/superfed_sweep.json`` (``--no-baseline`` reuses its
FedAvg runs). 162 runs of 100 rounds took 13 minutes on 2 cores shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def cost(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

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


# --------------------------------------------------------------------------- the label-skew sweep
# (issue 19): SuperFed against each tracked subnet alone with FedAvg, per partition x seed, for the
# tuned job and for the job with the default training keys, and the ablations that matter.

SWEEP_RESULTS = ROOT / "benchmarks" / "results" / "superfed_sweep.json"
PARTITIONS = {
    "iid": ["data.partition=iid"],
    "dir100": ["data.partition=dirichlet", "data.alpha=100.0"],
    "dir0.5": ["data.partition=dirichlet", "data.alpha=0.5"],
    "dir0.1": ["data.partition=dirichlet", "data.alpha=0.1"],
}
# SuperFed variants: overrides on top of the setting ("defaults": whatever the setting resolves to)
VARIANTS = {
    "defaults": [],
    "paper": [],  # filled in by paper_overrides(): the paper's reading of every [superfed] option
    # one change at a time from the paper's reading
    "samples": ["superfed.beta0=0.9", "superfed.weighting=samples"],
    "uniform": ["superfed.beta0=0.125", "superfed.weighting=maxnet"],  # β0 = β_end = 1/K: no MaxNet phase
    "beta0.5": ["superfed.beta0=0.5", "superfed.weighting=maxnet"],
    "decay0.3": ["superfed.beta0=0.9", "superfed.decay_fraction=0.3", "superfed.weighting=maxnet"],
    "cohort": ["superfed.beta0=0.9", "superfed.weighting=maxnet", "superfed.average=cohort"],
    # on top of the new defaults (no MaxNet phase, sample weights)
    "+cohort": ["superfed.average=cohort"],
    "+distill-largest": ["superfed.distill=0.3", "superfed.teacher=largest"],
    "+distill-subnet": ["superfed.distill=0.3", "superfed.teacher=subnet"],
    "+beta0.3": ["superfed.beta0=0.3"],
    "+beta0.2const": ["superfed.beta0=0.2", "superfed.beta_end=0.2"],
    "+largest2": ["superfed.largest_clients=2"],
    "+largest3": ["superfed.largest_clients=3"],
}
LAST = 4  # evaluations averaged for the "last 4" column (rounds 85-100 at eval_every 5)


def setting_overrides(setting: str) -> list[str]:
    """``tuned``: the job as written; ``default``: every [train] and [superfed] key the job sets
    put back to hpcfed's default (superfed.depths: the job's [1, 2, 3] is the default's "all")."""
    if setting == "tuned":
        return []
    from hpcfed.config import SuperFedConfig, TrainConfig

    job = load_job(JOB)
    out = []
    for table, default in (("train", TrainConfig()), ("superfed", SuperFedConfig())):
        mine = getattr(job, table)
        for key in type(default).model_fields:
            want, have = getattr(default, key), getattr(mine, key)
            if want is not None and have != want:
                out.append(f"{table}.{key}={_toml_value(want)}")
            elif want is None and have is not None and (table, key) != ("superfed", "depths"):
                raise SystemExit(f"{JOB.name} sets {table}.{key}, whose default (None) no override can give")
    return out


def paper_overrides() -> list[str]:
    """The paper's (and the authors' headline runs') reading of every [superfed] option we add."""
    return [
        "superfed.beta0=0.9",
        "superfed.decay_fraction=0.8",
        "superfed.weighting=maxnet",
        "superfed.distill=0.0",
        "superfed.average=covering",
    ]


def variant_overrides(name: str) -> list[str]:
    return paper_overrides() if name == "paper" else VARIANTS[name]


def curve(out: dict) -> tuple[list[int], list[list[float]]]:
    return out["family"]["round"], out["family"]["accuracy"]


def run_family(overrides: list[str]) -> dict:
    """run_job, keeping every evaluation of the family (SuperFed) or of test_accuracy (FedAvg)."""
    import h5py

    out = run_job(overrides)
    job = load_job(JOB, overrides)
    with h5py.File(job.run_dir / "log.h5", "r", locking=False) as f:
        if "family" in f:
            out["family"]["round"] = f["family"]["round"][()].tolist()
            out["family"]["accuracy"] = f["family"]["accuracy"][()].tolist()
    m = out.pop("metrics")
    acc = np.array(m["test_accuracy"])
    ok = ~np.isnan(acc)
    out["rounds"] = np.array(m["round"])[ok].tolist()
    out["accuracy"] = acc[ok].tolist()
    out["bytes"] = int(np.sum(m["bytes_up"]) + np.sum(m["bytes_down"]))
    shutil.rmtree(job.run_dir, ignore_errors=True)
    return out


def sweep(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="SuperFed vs each subnet alone, per partition and seed")
    p.add_argument("--settings", nargs="+", default=["default", "tuned"], choices=["default", "tuned"])
    p.add_argument("--partitions", nargs="+", default=["iid", "dir0.5", "dir0.1"], choices=list(PARTITIONS))
    p.add_argument("--variants", nargs="+", default=["defaults", "paper"], choices=list(VARIANTS))
    p.add_argument("--extra", nargs="*", default=[], help="more variants as NAME=key=value,key=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (processes)")
    p.add_argument("--no-baseline", action="store_true", help="reuse the FedAvg runs of --out")
    p.add_argument("--set", nargs="*", default=[], help="key=value for every run (use a separate --out)")
    p.add_argument("--out", type=Path, default=SWEEP_RESULTS)
    args = p.parse_args(argv)

    variants = {v: variant_overrides(v) for v in args.variants}
    for e in args.extra:
        name, _, keys = e.partition("=")
        variants[name] = keys.split(",")
    base = load_job(JOB)
    ladder = elastic_space(base.model, base.superfed).ladder(4)
    tmp = Path(tempfile.mkdtemp(prefix="bench-superfed-sweep-"))
    old = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}, "variants": {}}
    tasks = {}
    for setting in args.settings:
        for part in args.partitions:
            for seed in args.seeds:
                common = [
                    *setting_overrides(setting),
                    *PARTITIONS[part],
                    f"rounds={args.rounds}",
                    f"seed={seed}",
                    f"out={tmp}",
                    "checkpoint_every=100000",
                    *args.set,
                ]
                tag = f"{setting}|{part}|{seed}"
                for v, ov in variants.items():
                    tasks[f"{tag}|sf:{v}"] = [*common, *ov, f"name=sf-{v}-{setting}-{part}-{seed}"]
                for i, spec in enumerate(ladder):
                    if args.no_baseline and f"{tag}|fa:{i}" in old["runs"]:
                        continue
                    tasks[f"{tag}|fa:{i}"] = [
                        *common,
                        "algorithm=fedavg",
                        f"model.subnet={_toml_value(spec)}",
                        f"name=fa-{i}-{setting}-{part}-{seed}",
                    ]
    print(f"{len(tasks)} runs of {args.rounds} rounds in {tmp}", flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(run_family, ov) for key, ov in tasks.items()}
        done = {}
        for key, f in futures.items():
            done[key] = f.result()
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    old["runs"].update(done)
    old["variants"].update(variants)
    old.update(job=str(JOB.relative_to(ROOT)), rounds=args.rounds, subnets=[spec_text(s) for s in ladder])
    old["set"] = args.set
    old["summary"] = summarise(old, ladder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old, indent=None) + "\n")
    print_summary(old["summary"], args)
    print(f"wrote {args.out}")


def summarise(res: dict, ladder: list[dict]) -> dict:
    """Per (setting, partition, variant): per subnet the SuperFed and FedAvg accuracies (final and
    mean of the last LAST evaluations) for every seed, their means and the differences."""
    runs, out = res["runs"], {}
    for key, sf in runs.items():
        setting, part, seed, what = key.split("|")
        if not what.startswith("sf:"):
            continue
        row = out.setdefault(f"{setting}|{part}|{what[3:]}", {"seeds": [], "subnets": {}})
        row["seeds"].append(int(seed))
        for i, spec in enumerate(ladder):
            fa = runs.get(f"{setting}|{part}|{seed}|fa:{i}")
            if fa is None:
                continue
            acc = np.array(sf["family"]["accuracy"])[:, i]
            r = row["subnets"].setdefault(spec_text(spec), {"sf": [], "fa": [], "sf_last": [], "fa_last": []})
            r["sf"].append(float(acc[-1]))
            r["fa"].append(float(fa["accuracy"][-1]))
            r["sf_last"].append(float(acc[-LAST:].mean()))
            r["fa_last"].append(float(np.mean(fa["accuracy"][-LAST:])))
    for row in out.values():
        for r in row["subnets"].values():
            d = np.array(r["sf"]) - np.array(r["fa"])
            r["diff"] = d.tolist()
            r["diff_mean"] = float(d.mean())
            r["diff_min"] = float(d.min())
            r["diff_last_mean"] = float(np.mean(np.array(r["sf_last"]) - np.array(r["fa_last"])))
    return out


def print_summary(summary: dict, args=None) -> None:
    print(
        f"\n{'setting|partition|variant':34s} {'subnet':34s} {'SF':>6s} {'alone':>6s} {'diff':>6s} "
        f"{'min':>6s} {'last4':>6s}  per seed"
    )
    for key in sorted(summary):
        for sub, r in summary[key]["subnets"].items():
            seeds = " ".join(f"{100 * x:+.1f}" for x in r["diff"])
            print(
                f"{key:34s} {sub:34s} {100 * np.mean(r['sf']):6.2f} {100 * np.mean(r['fa']):6.2f} "
                f"{100 * r['diff_mean']:+6.2f} {100 * r['diff_min']:+6.2f} "
                f"{100 * r['diff_last_mean']:+6.2f}  {seeds}"
            )


# --------------------------------------------------------------------------- diagnosis (no training)
DIAGNOSIS = ROOT / "benchmarks" / "results" / "superfed_diagnosis.json"


def label_mix(weights: np.ndarray, hist: np.ndarray) -> tuple[float, float]:
    """(effective number of clients (Σw)²/Σw², total variation of the weighted label mix
    Σ w_c q_c / Σ w_c from the uniform mix) for the clients covering one element."""
    w = weights[weights > 0]
    q = hist[weights > 0] / hist[weights > 0].sum(1, keepdims=True)
    mix = (w[:, None] * q).sum(0) / w.sum()
    return float(w.sum() ** 2 / (w**2).sum()), float(0.5 * np.abs(mix - 1 / hist.shape[1]).sum())


def diagnose_one(overrides: list[str]) -> dict:
    """Replays the assignment (no training) and reports, per phase of the β schedule, how many
    clients effectively train the smallest subnet's weights and the largest subnet's own weights
    (the last hidden layer's units only the widest subnets have), and how skewed the label mix
    their round's average is made of; FedAvg's (all K clients, weights n_c) for comparison."""
    from hpcfed.algorithms.superfed import client_weight, maxnet_beta, sandwich
    from hpcfed.data import load_federated
    from hpcfed.flat import FlatModel
    from hpcfed.models.elastic import make_subnet
    from hpcfed.rng import cohort, numpy_generator

    job = load_job(JOB, overrides)
    cfg, K = job.superfed, job.clients_per_round
    data = load_federated(job.data, job.seed)
    hist = np.stack([np.bincount(data.client(c)[1].numpy(), minlength=10) for c in range(data.num_clients)])
    space = elastic_space(job.model, cfg)
    from hpcfed.models import build_model

    supernet = FlatModel(build_model(job.model, (64,), 10))
    index = {}

    def covers(spec):
        key = spec_text(spec)
        if key not in index:
            index[key] = set(make_subnet(space, spec, supernet, (64,), 10).index.tolist())
        return index[key]

    big_idx = covers(space.largest())
    small_idx = covers(space.smallest())
    # an element of the deepest layer's widest units (no shallower or narrower uniform subnet has it)
    others = [
        space.uniform(d, r) for d in space.depths for r in space.ratios if (d, r) != (space.depths[-1], 1.0)
    ]
    probe_big = max(big_idx.difference(*(covers(o) for o in others)))
    probe_small = min(small_idx)
    largest, smallest = np.zeros(data.num_clients, np.int64), np.zeros(data.num_clients, np.int64)
    beta_end = cfg.beta_end if cfg.beta_end is not None else 1 / K
    T = max(1, round(cfg.decay_fraction * job.rounds))
    rows = []
    for t in range(job.rounds):
        clients = cohort(job.seed, t, data.num_clients, K)
        big, small = sandwich(clients, largest, smallest, cfg.largest_clients)
        largest[big] += 1
        smallest[small] += 1
        beta = maxnet_beta(t, job.rounds, cfg.beta0 or beta_end, beta_end, cfg.decay_fraction)
        w_small, w_big = np.zeros(len(clients)), np.zeros(len(clients))
        for j, c in enumerate(clients.tolist()):
            other = (1 - len(big) * beta) / (K - len(big))
            if c in big:
                spec, share = space.largest(), beta
            elif c == small:
                spec, share = space.smallest(), other
            else:
                spec, share = space.sample(numpy_generator(job.seed, "superfed-subnet", t, c)), other
            w = client_weight(share, float(hist[c].sum()), cfg.weighting)
            idx = covers(spec)
            w_small[j] = w if probe_small in idx else 0.0
            w_big[j] = w if probe_big in idx else 0.0
        h = hist[clients]
        ess_s, tv_s = label_mix(w_small, h)
        ess_b, tv_b = label_mix(w_big, h)
        ess_f, tv_f = label_mix(h.sum(1).astype(float), h)
        rows.append((t < T, ess_s, tv_s, ess_b, tv_b, ess_f, tv_f, int((hist[big] > 0).sum())))
    a = np.array(rows, dtype=float)
    out = {}
    for name, sel in (("decay", a[:, 0] == 1), ("after", a[:, 0] == 0), ("all", np.ones(len(a), bool))):
        if sel.any():
            m = a[sel].mean(0)
            out[name] = {
                "smallest_clients": m[1], "smallest_tv": m[2], "largest_own_clients": m[3],
                "largest_own_tv": m[4], "fedavg_clients": m[5], "fedavg_tv": m[6],
                "largest_holder_classes": m[7],
            }  # fmt: skip
    return out


def diagnose(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="who trains the smallest and largest subnets under skew")
    p.add_argument("--partitions", nargs="+", default=["iid", "dir0.5", "dir0.1"], choices=list(PARTITIONS))
    p.add_argument("--variants", nargs="+", default=["paper", "samples", "uniform"], choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=DIAGNOSIS)
    args = p.parse_args(argv)
    res = {}
    for part in args.partitions:
        for v in args.variants:
            per = [diagnose_one([*PARTITIONS[part], *variant_overrides(v), f"seed={s}"]) for s in args.seeds]
            res[f"{part}|{v}"] = {
                ph: {k: float(np.mean([d[ph][k] for d in per])) for k in per[0][ph]} for ph in per[0]
            }
    print(
        f"{'partition|variant':22s} {'phase':6s} {'small: clients':>14s} {'TV':>5s} "
        f"{'largest own: clients':>20s} "
        f"{'TV':>5s} {'FedAvg: clients':>15s} {'TV':>5s} {'classes of largest holder':>26s}"
    )
    for key, ph in res.items():
        for name, d in ph.items():
            print(
                f"{key:22s} {name:6s} {d['smallest_clients']:14.2f} {d['smallest_tv']:5.2f} "
                f"{d['largest_own_clients']:20.2f} {d['largest_own_tv']:5.2f} {d['fedavg_clients']:15.2f} "
                f"{d['fedavg_tv']:5.2f} {d['largest_holder_classes']:26.2f}"
            )
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


def plot(argv: list[str]) -> None:
    """Differences SuperFed − alone per subnet (mean over seeds, bars from the worst to the best
    seed), one panel per setting × partition, one bar colour per variant; the target line at −2."""
    p = argparse.ArgumentParser(description="plot the sweep")
    p.add_argument("--results", type=Path, default=SWEEP_RESULTS)
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("-o", "--out", type=Path, default=SWEEP_RESULTS.with_suffix(".png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(args.results.read_text())
    summary, subnets = res["summary"], res["subnets"]
    keys = [k.split("|") for k in summary]
    settings = [s for s in ("default", "tuned") if any(k[0] == s for k in keys)]
    parts = [q for q in PARTITIONS if any(k[1] == q for k in keys)]
    variants = args.variants or sorted({k[2] for k in keys})
    labels = ["smallest", "middle 1", "middle 2", "largest"][: len(subnets)]
    fig, axes = plt.subplots(
        len(settings), len(parts), figsize=(4 * len(parts), 3.2 * len(settings)), sharey=True, squeeze=False
    )
    width = 0.8 / len(variants)
    for r, setting in enumerate(settings):
        for c, part in enumerate(parts):
            ax = axes[r][c]
            for j, v in enumerate(variants):
                row = summary.get(f"{setting}|{part}|{v}")
                if row is None:
                    continue
                d = [100 * np.array(row["subnets"][s]["diff"]) for s in subnets]
                x = np.arange(len(subnets)) + (j - (len(variants) - 1) / 2) * width
                mean = [e.mean() for e in d]
                err = [[m - e.min() for m, e in zip(mean, d)], [e.max() - m for m, e in zip(mean, d)]]
                ax.bar(x, mean, width, yerr=err, capsize=2, label=v)
            ax.axhline(-2, color="k", lw=0.8, ls="--")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xticks(np.arange(len(subnets)), labels, fontsize=8)
            ax.set_title(f"{setting} keys, {part}", fontsize=9)
            if c == 0:
                ax.set_ylabel("SuperFed − alone (points)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"digits, {res['rounds']} rounds, seeds {sorted({int(k.split('|')[2]) for k in res['runs']})}: "
        "mean over seeds, bars worst to best seed; target ≥ −2",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def table(argv: list[str]) -> None:
    """The markdown tables of docs/superfed.md and BENCHMARKS.md from the sweep's results."""
    p = argparse.ArgumentParser(description="markdown tables of the sweep")
    p.add_argument("--results", type=Path, default=SWEEP_RESULTS)
    p.add_argument("--variants", nargs="+", default=["paper", "defaults"])
    p.add_argument("--ablations", nargs="*", default=[])
    args = p.parse_args(argv)
    res = json.loads(args.results.read_text())
    summary, subnets = res["summary"], res["subnets"]
    names = ["smallest", "middle 1", "middle 2", "largest"]
    for setting in ("default", "tuned"):
        print(f"\n{setting} keys: SuperFed − alone, mean over seeds (per seed)\n")
        head = " | ".join(f"{v}" for v in args.variants)
        print(f"| partition | subnet | alone | {head} |")
        print("| --- | --- | ---: |" + " ---: |" * len(args.variants))
        for part in PARTITIONS:
            if f"{setting}|{part}|{args.variants[0]}" not in summary:
                continue
            for name, sub in zip(names, subnets):
                alone = 100 * np.mean(summary[f"{setting}|{part}|{args.variants[0]}"]["subnets"][sub]["fa"])
                cells = []
                for v in args.variants:
                    r = summary[f"{setting}|{part}|{v}"]["subnets"][sub]
                    d = 100 * r["diff_mean"]
                    seeds = ", ".join(f"{100 * x:+.1f}" for x in r["diff"])
                    cell = f"{d:+.2f} ({seeds})"
                    cells.append(f"**{cell}**" if d < -2 else cell)
                print(f"| {part} | {name} | {alone:.2f} | " + " | ".join(cells) + " |")
    if args.ablations:
        print("\nAblations: SuperFed − alone, mean over seeds and the 4 subnets (worst subnet mean)\n")
        cols = [f"{s} {q}" for s in ("default", "tuned") for q in PARTITIONS if f"{s}|{q}|paper" in summary]
        print("| variant | " + " | ".join(cols) + " |")
        print("| --- |" + " ---: |" * len(cols))
        for v in args.ablations:
            cells = []
            for c in cols:
                row = summary.get(c.replace(" ", "|") + f"|{v}")
                if row is None:
                    cells.append("")
                    continue
                d = [100 * row["subnets"][s]["diff_mean"] for s in subnets]
                cells.append(f"{np.mean(d):+.2f} ({min(d):+.2f})")
            print(f"| {v} | " + " | ".join(cells) + " |")


def main() -> None:
    import sys

    commands = {"cost": cost, "sweep": sweep, "diagnose": diagnose, "plot": plot, "table": table}
    argv = sys.argv[1:]
    if argv and argv[0] in commands:
        commands[argv[0]](argv[1:])
    else:
        cost(argv)


if __name__ == "__main__":
    main()
