"""Every shipped job file runs end to end, small, through the CLI; the digits job reaches its target.

``jobs/*.toml`` is discovered at collection time, so a new job file is covered without touching
this module. Each job runs for 2 rounds on a handful of clients, with stand-in data where it
needs files (a tiny TFF-layout HDF5 pair for ``h5``, a tiny torchvision root for ``cifar10`` and
``mnist``), and must leave a ``log.h5`` with both rounds and a checkpoint that loads with
``strict=True`` into the model the job names. Jobs whose algorithm the installed hpcfed does not
know yet are skipped.

Also here: an exception on one MPI rank (one client's data corrupt, read mid-run by the rank that
trains it) ends the whole ``mpirun`` promptly instead of hanging in a collective.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcfed.checkpoint import list_checkpoints, load_state_dict
from hpcfed.config import ALGORITHMS, load_job
from hpcfed.data import load_federated
from hpcfed.io.metrics import read_metrics
from hpcfed.models import build_model
from hpcfed.rng import cohort

from .conftest import ROOT, hpcfed, run_mpi

JOBS = sorted((ROOT / "jobs").glob("*.toml"))
FEMNIST = ROOT / "jobs" / "fedavg_femnist.toml"
DIGITS = ROOT / "jobs" / "fedavg_digits.toml"

SMALL_CLIENTS = 4  # data.num_clients of the small runs
SMALL_COHORT = 2  # clients_per_round of the small runs
# Models too slow for a smoke run on a busy CPU (ResNet-18: ~4 s a round even on 5 images, and
# 45 MB checkpoints) run as a smaller model of the same family; the job's own model is still
# built and run forward on the stand-in data in-process.
SMALL_MODELS = {"resnet18": "resnet8"}


# --------------------------------------------------------------------------- stand-in data


def write_tff(path: Path, sizes: dict[str, int], num_classes: int = 10, seed: int = 0) -> None:
    """A TFF/FedML federated EMNIST-style file: ``examples/<id>/pixels`` (n, 28, 28) float32 in
    [0, 1] and ``examples/<id>/label`` (n,) int32. Labels cycle through every class, so the
    class count the loader infers from them is ``num_classes``."""
    g = np.random.default_rng(seed)
    offset = 0
    with h5py.File(path, "w") as f:
        examples = f.create_group("examples")
        for cid, n in sizes.items():
            grp = examples.create_group(cid)
            grp.create_dataset("pixels", data=g.random((n, 28, 28), dtype=np.float32))
            grp.create_dataset("label", data=((np.arange(n) + offset) % num_classes).astype(np.int32))
            offset += n


def tff_pair(folder: Path, num_clients: int = 6) -> tuple[Path, Path]:
    """Train and test files in the TFF layout, ``num_clients`` writers of 5-10 samples each."""
    train, test = folder / "fed_train.h5", folder / "fed_test.h5"
    write_tff(train, {f"f{i:04d}": 5 + i % 6 for i in range(num_clients)})
    write_tff(test, {"f0000": 6, "f0001": 6}, seed=1)
    return train, test


def write_cifar10_bin(root: Path, per_batch: int = 4) -> None:
    """``{root}/cifar-10-batches-bin/``: 5 training batches and a test batch of ``per_batch``
    records each, a record being 1 label byte and 3,072 pixel bytes (R, G, B planes of 32x32)."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for k, name in enumerate(names):
        records = g.integers(0, 256, (per_batch, 3073), dtype=np.uint8)
        records[:, 0] = (np.arange(per_batch) + k * per_batch) % 10
        records.tofile(folder / name)


def write_mnist(root: Path, n_train: int = 20, n_test: int = 8) -> None:
    """``{root}/MNIST/raw/``: the four IDX files torchvision leaves on disk (uncompressed)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(0)

    def idx(name: str, arr: np.ndarray) -> None:
        header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
        (raw / name).write_bytes(header + arr.astype(np.uint8).tobytes())

    for split, n in (("train", n_train), ("t10k", n_test)):
        idx(f"{split}-images-idx3-ubyte", g.integers(0, 256, (n, 28, 28)))
        idx(f"{split}-labels-idx1-ubyte", np.arange(n) % 10)


def data_overrides(dataset: str, folder: Path) -> list[str]:
    """Write stand-in data for ``dataset`` under ``folder``; the overrides that point at it."""
    if dataset == "h5":
        train, test = tff_pair(folder)
        return [f'data.path="{train}"', f'data.test_path="{test}"']
    if dataset == "cifar10":
        write_cifar10_bin(folder)
        return [f'data.path="{folder}"']
    if dataset == "mnist":
        write_mnist(folder)
        return [f'data.path="{folder}"']
    if dataset in ("leaf", "fed_shakespeare", "pfl"):
        from . import text_layouts as layouts

        # Both LEAF jobs name dataset "leaf": the job under test (pytest's PYTEST_CURRENT_TEST,
        # "...::test_job_runs_small[<job stem>] (call)") says whether its model reads images or text.
        current = os.environ.get("PYTEST_CURRENT_TEST", "")
        stem = current.partition("[")[2].partition("]")[0]
        job = ROOT / "jobs" / f"{stem}.toml"
        model = tomllib.loads(job.read_text()).get("model", {}).get("name") if job.is_file() else None
        corpus = layouts.stdlib_corpus(6, max_lines=4)
        leaf = [
            f'data.path="{folder / "train"}"', f'data.test_path="{folder / "test"}"',
            f'data.options.index_cache="{folder / "index"}"',  # not the user's ~/.cache
        ]  # fmt: skip
        if dataset == "leaf" and model not in ("char_lstm", "char_transformer"):  # FEMNIST
            layouts.write_leaf(folder / "train", layouts.femnist_users(6, (5, 10), 0), 3, "train")
            layouts.write_leaf(folder / "test", layouts.femnist_users(6, (2, 3), 1), 2, "test")
            return leaf
        if dataset == "leaf":  # Shakespeare: 80-character windows of two lines per speaker
            train, test = layouts.shakespeare_users({k: v[:3] for k, v in corpus.items()}, test_every=3)
            plays = ["THE_STDLIB"] * len(train)
            layouts.write_leaf(folder / "train", train, 2, "train", hierarchies=plays)
            layouts.write_leaf(folder / "test", test, 2, "test", hierarchies=plays)
            return leaf
        if dataset == "fed_shakespeare":
            train, test = layouts.corpus_snippets(corpus, lines_per_snippet=1, test_every=4)
            layouts.write_fed_shakespeare(folder / "shakespeare_train.h5", train)
            layouts.write_fed_shakespeare(folder / "shakespeare_test.h5", test)
            paths = folder / "shakespeare_train.h5", folder / "shakespeare_test.h5"
            return [f'data.path="{paths[0]}"', f'data.test_path="{paths[1]}"']
        splits = {"train": layouts.pfl_users(6, 50, 20, 0), "test": layouts.pfl_users(3, 50, 20, 1)}
        layouts.write_pfl(folder / "pfl.hdf5", splits, vocab_size=50)
        return [f'data.path="{folder / "pfl.hdf5"}"', f'data.test_path="{folder / "pfl.hdf5"}"']
    return []  # digits, synthetic: nothing to fetch


def small_overrides(raw: dict, folder: Path) -> list[str]:
    out = folder / "runs"
    data = folder / "data"
    data.mkdir()
    overrides = [
        f'out="{out}"',
        "rounds=2",
        "eval_every=1",
        "checkpoint_every=1",
        f"data.num_clients={SMALL_CLIENTS}",
        f"clients_per_round={SMALL_COHORT}",
        *data_overrides(raw.get("data", {}).get("dataset", "digits"), data),
    ]
    if raw.get("data", {}).get("partition") == "classes":  # 4 clients must still cover 10 classes
        overrides.append("data.classes_per_client=3")
    model = raw.get("model", {}).get("name", "mlp")
    if model in SMALL_MODELS:
        overrides.append(f"model.name={SMALL_MODELS[model]}")
    if raw.get("algorithm") == "hadfl":  # steps per cycle, not epochs: 40 ResNet steps is no smoke run
        overrides.append("hadfl.local_steps=2")
    if raw.get("device") == "cuda" and not torch.cuda.is_available():
        overrides.append("device=cpu")  # a GPU job still runs its CPU path here
    return overrides


# --------------------------------------------------------------------------- every job file


def test_jobs_are_discovered():
    names = {p.name for p in JOBS}
    assert {"fedavg_digits.toml", "fedavg_synthetic.toml", "fedavg_femnist.toml"} <= names
    assert "fedavg_cifar10.toml" in names and "quickstart.toml" in names


@pytest.mark.parametrize("job_file", JOBS, ids=[p.stem for p in JOBS])
def test_job_runs_small(tmp_path, job_file):
    raw = tomllib.loads(job_file.read_text())
    if raw.get("algorithm") not in ALGORITHMS:
        pytest.skip(f"algorithm {raw.get('algorithm')!r} is not in this hpcfed ({', '.join(ALGORITHMS)})")
    overrides = small_overrides(raw, tmp_path)
    # (the subprocess timeout catches a hang; speed is the benchmarks' business, not a test's)
    proc = hpcfed("run", job_file, *overrides, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    job = load_job(job_file, overrides)
    run_dir = job.run_dir
    attrs, metrics = read_metrics(run_dir / "log.h5")
    assert attrs["algorithm"] == job.algorithm
    assert metrics["round"].tolist() == [0, 1]
    assert np.isfinite(metrics["test_accuracy"]).all() and np.isfinite(metrics["train_loss"]).all()
    assert (metrics["bytes_up"] > 0).all()

    ckpts = list_checkpoints(run_dir)
    assert ckpts and ckpts[0].name == "round_000002.h5"
    data = load_federated(job.data, job.seed)  # the stand-in data: tiny, loads in-process
    model = build_model(job.model, data.input_shape, data.num_classes)
    state = load_state_dict(ckpts[0])
    model.load_state_dict(state, strict=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    file_model = load_job(job_file, []).model
    if file_model != job.model:  # a smaller stand-in ran: still build and run the job's own model
        own = build_model(file_model, data.input_shape, data.num_classes).eval()
        x = data.client(0)[0][:2]
        with torch.no_grad():
            assert own(x).shape == (len(x), data.num_classes)


# --------------------------------------------------------------------------- the digits target


def test_digits_job_reaches_target_accuracy(tmp_path):
    """The reference workload (Flower, pfl and a plain PyTorch loop reach 0.886 on it)."""
    proc = hpcfed("run", DIGITS, f'out="{tmp_path}"', timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job = load_job(DIGITS, [f'out="{tmp_path}"'])
    assert (job.rounds, job.data.num_clients, job.clients_per_round) == (50, 100, 10)
    _, metrics = read_metrics(job.run_dir / "log.h5")
    assert metrics["round"].tolist() == list(range(50))
    final = float(metrics["test_accuracy"][-1])
    print(f"fedavg-digits final test accuracy: {final:.4f}")
    assert final >= 0.85, final


# --------------------------------------------------------------------------- a failing rank


def _corrupt_pixels(path: Path, cid: str) -> None:
    """Bit rot in one client's (checksummed) pixels: the up-front scan (shapes, dtypes and labels
    only) accepts the file, and only the read of that client's data fails."""
    with h5py.File(path, "r+") as f:
        grp = f["examples"][cid]
        pixels = grp["pixels"][()]
        del grp["pixels"]
        ds = grp.create_dataset("pixels", data=pixels, fletcher32=True, chunks=pixels.shape)
        offset = ds.id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 100] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate_labels(path: Path, cid: str) -> None:
    with h5py.File(path, "r+") as f:
        grp = f["examples"][cid]
        label = grp["label"][()]
        del grp["label"]
        grp.create_dataset("label", data=label[:-1])


def _run_mpi(args: list[str], ranks: int, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """``mpirun -n ranks python -m hpcfed ARGS`` (conftest.run_mpi: a hang is killed and fails)."""
    return run_mpi(["-m", "hpcfed", *args], ranks, timeout)


@pytest.mark.parametrize("corruption", ["pixels_mid_run", "labels_at_setup"])
def test_corrupt_client_ends_mpi_job_promptly(tmp_path, corruption):
    """One writer's data is corrupt. ``pixels_mid_run``: the scan at set-up reads only shapes and
    labels, so the file is accepted and the bad client first fails in round 1, on the one rank that
    trains it, while the other rank waits in the round's Allreduce: the job must abort, not hang.
    ``labels_at_setup``: a label count that does not match the pixels is caught by the scan on
    every rank before the first round: exit 2, one error line naming the file and the client."""
    train, test = tff_pair(tmp_path, num_clients=6)
    base = ["data.num_clients=6", f"clients_per_round={SMALL_COHORT}"]
    job = load_job(FEMNIST, base)
    with h5py.File(train, "r") as f:
        ids = sorted(f["examples"])
    # a client of round 1 that is not in round 0: round 0 completes, the failure is mid-run
    first, second = (set(cohort(job.seed, r, 6, SMALL_COHORT).tolist()) for r in (0, 1))
    assert second - first, "pick another seed or cohort size: round 1 repeats round 0"
    bad = ids[min(second - first)]
    (_corrupt_pixels if corruption == "pixels_mid_run" else _truncate_labels)(train, bad)

    out = tmp_path / "runs"
    args = ["run", str(FEMNIST), f'out="{out}"', "rounds=3", "eval_every=1", "checkpoint_every=1"]
    args += [*base, f'data.path="{train}"', f'data.test_path="{test}"']
    proc, elapsed = _run_mpi(args, ranks=2, timeout=60)
    print(f"{corruption}: exit {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert elapsed < 60

    if corruption == "labels_at_setup":
        lines = [line for line in proc.stderr.splitlines() if line.startswith("hpcfed: error:")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert str(train) in lines[0] and f"examples/{bad}" in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
        return

    # Mid-run: the failing rank reports the loader's error and MPI_Abort ends every rank.
    assert "cannot read its data" in proc.stderr, proc.stderr[-3000:]
    _, metrics = read_metrics(out / job.name / "log.h5")
    assert 0 in metrics["round"].tolist() and 2 not in metrics["round"].tolist()
    # interface.md: a corrupt dataset is exit 2 with one line naming the file (and the client)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcfed: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(train) in errors[0] and f"examples/{bad}" in errors[0]
