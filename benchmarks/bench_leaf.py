"""LEAF JSON at FEMNIST's size: load time and peak memory per rank, 1 rank against 2.

Generates (once, into ``--data``) a LEAF-layout FEMNIST stand-in: 3,500 writers in 35 train files
(100 per file, as LEAF's ``data_to_json.py`` groups them) and 35 test files, each writer with
``--samples`` (about 200, varying) training images of 784 pixel values written as LEAF writes them
(``json.dump`` of ``k / 255`` floats, a white background with strokes), 10 % as many for test:
about 4 GB of JSON, the size of LEAF's full FEMNIST. Then, under ``mpirun -n R``, every rank
does what a run's start does and what its rounds read:

1. ``load_federated`` of ``jobs/fedavg_femnist_leaf.toml`` with every writer (``natural``):
   ``cold`` = the index cache empty, so the ranks scan the 70 files (sharing them through the
   per-file locks), ``warm`` = the index cached by the cold run;
2. the pooled test set (every test writer, ~70,000 images, all ranks);
3. ``--rounds`` rounds of ``--per-round`` clients from the engine's cohort, each rank reading
   its share (one byte span each).

Reported per rank: seconds of each phase and the peak resident memory (``ru_maxrss``) after it,
beside the memory after the imports; the bytes of training files each rank read. A rank's memory
must not grow with the rank count: it holds the index, the test set and its own clients.

    python benchmarks/bench_leaf.py [--data DIR] [--ranks 1 2] [--out benchmarks/results/leaf.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "fedavg_femnist_leaf.toml"
PIXELS = np.array([json.dumps(k / 255).encode() for k in range(256)], dtype=object)  # LEAF's vec / 255


def _user_json(g: np.random.Generator, n: int) -> bytes:
    """One writer's ``{"x": [...], "y": [...]}`` as LEAF's json.dump writes it."""
    pix = np.full((n, 784), 255, np.uint8)  # FEMNIST is dark strokes on white (1.0)
    strokes = g.random((n, 784)) < 0.15
    pix[strokes] = g.integers(0, 255, int(strokes.sum()))
    rows = b", ".join(b"[" + b", ".join(PIXELS[r]) + b"]" for r in pix)
    labels = ", ".join(map(str, g.integers(0, 62, n).tolist())).encode()
    return b'{"x": [' + rows + b'], "y": [' + labels + b"]}"


def generate(folder: Path, users: int, files: int, samples: int, seed: int = 0) -> None:
    marker = folder / "params.json"
    params = {"users": users, "files": files, "samples": samples, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return
    shutil.rmtree(folder, ignore_errors=True)
    g = np.random.default_rng(seed)
    t0 = time.perf_counter()
    per_file = -(-users // files)
    for split, scale in (("train", 1.0), ("test", 0.1)):
        (folder / split).mkdir(parents=True)
        for f in range(files):
            ids = [f"f{u:04d}_{u % 89:02d}" for u in range(f * per_file, min(users, (f + 1) * per_file))]
            sizes = [max(1, int(scale * g.integers(samples // 2, 3 * samples // 2 + 1))) for _ in ids]
            with open(folder / split / f"all_data_{f}_niid_0_keep_0_{split}_9.json", "wb") as out:
                out.write(b'{"users": ' + json.dumps(ids).encode() + b', "num_samples": ')
                out.write(json.dumps(sizes).encode() + b', "user_data": {')
                for i, (uid, n) in enumerate(zip(ids, sizes)):
                    out.write(
                        (", " if i else "").encode() + json.dumps(uid).encode() + b": " + _user_json(g, n)
                    )
                out.write(b"}}")
    marker.write_text(json.dumps(params))
    size = sum(p.stat().st_size for p in folder.rglob("*.json")) / 2**30
    print(f"generated {folder}: {users} writers, {files} files per split, {size:.2f} GiB, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> None:
    """One rank: the phases of the module docstring; rank 0 prints every rank's row as JSON."""
    from mpi4py import MPI

    import hpcfed.data.leaf as leaf
    from hpcfed.config import load_job
    from hpcfed.data import load_federated
    from hpcfed.rng import cohort

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    row = {"rank": rank, "imports_mib": _peak_mib()}
    job = load_job(JOB, [
        f'data.path="{args.data / "train"}"', f'data.test_path="{args.data / "test"}"',
        f"data.num_clients={args.users}", f'data.options.index_cache="{args.cache}"',
    ])  # fmt: skip
    comm.Barrier()
    t0 = time.perf_counter()
    data = load_federated(job.data, job.seed)
    row["load_s"], row["load_mib"] = time.perf_counter() - t0, _peak_mib()
    comm.Barrier()
    t0 = time.perf_counter()
    tx, _ = data.test
    row["test_s"], row["test_mib"], row["test_samples"] = (
        time.perf_counter() - t0,
        _peak_mib(),
        int(tx.shape[0]),
    )
    leaf.BYTES_READ.clear()
    comm.Barrier()
    t0 = time.perf_counter()
    clients = 0
    for r in range(args.rounds):
        for cid in cohort(job.seed, r, data.num_clients, args.per_round)[rank::size]:
            data.client(int(cid))
            clients += 1
    row["read_s"], row["read_mib"], row["clients_read"] = time.perf_counter() - t0, _peak_mib(), clients
    row["train_bytes_read"] = sum(n for f, n in leaf.BYTES_READ.items() if "/train/" in f)
    rows = comm.gather(row, root=0)
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/hpcfed-bench-leaf-femnist"))
    ap.add_argument("--users", type=int, default=3500)
    ap.add_argument("--files", type=int, default=35)
    ap.add_argument("--samples", type=int, default=200, help="mean training images per writer")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "leaf.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    generate(args.data, args.users, args.files, args.samples)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = Path(sys.executable).parent / "mpirun"
    results = []
    for ranks in args.ranks:
        cache = args.data / f"index-{ranks}"
        shutil.rmtree(cache, ignore_errors=True)
        for phase in ("cold", "warm"):
            cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-n", str(ranks), sys.executable, __file__,
                   "--worker", f"--data={args.data}", f"--cache={cache}", f"--users={args.users}",
                   f"--rounds={args.rounds}", f"--per-round={args.per_round}"]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if proc.returncode:
                sys.exit(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            rows = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS "))[5:])
            for row in rows:
                results.append({"ranks": ranks, "index": phase, **row})
                print(
                    f"ranks {ranks} {phase:4} rank {row['rank']}: load {row['load_s']:6.1f} s "
                    f"(peak {row['load_mib']:5.0f} MiB; after imports {row['imports_mib']:4.0f}), "
                    f"test {row['test_s']:5.1f} s ({row['test_samples']} images, "
                    f"peak {row['test_mib']:5.0f} MiB), {row['clients_read']} clients {row['read_s']:.2f} s "
                    f"({row['train_bytes_read'] / 2**20:.0f} MiB of train files), "
                    f"peak {row['read_mib']:5.0f} MiB",
                    flush=True,
                )
    files = sorted(args.data.rglob("all_data_*.json"))
    meta = {
        "users": args.users, "files_per_split": args.files, "mean_samples": args.samples,
        "json_gib": sum(p.stat().st_size for p in files) / 2**30, "rounds": args.rounds,
        "per_round": args.per_round, "python": platform.python_version(), "cpus": os.cpu_count(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
