"""Small files in the exact layouts of LEAF's JSON, TFF's ``fed_shakespeare`` HDF5 and pfl-research's
token HDF5, and a text corpus with real structure that ships with Python (the standard library's
docstrings, one "speaker" per module), for the tests and ``tests/test_jobs.py``.

The layouts (hpcfed/data/leaf.py and hpcfed/data/text.py cite the writers and readers):

* LEAF: ``{"users": [...], "num_samples": [...], "user_data": {u: {"x": [...], "y": [...]}}}`` per
  file, several files per split, named as LEAF's ``split_data.py`` names them;
* TFF: ``examples/<client>/snippets``, variable-length UTF-8 strings;
* pfl: ``<split>/<user>/inputs`` and ``targets`` int32, ``metadata/vocabulary_size``,
  ``metadata/pad_symbol``, ``metadata/unk_symbol``.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import numpy as np

from hpcfed.data.leaf import LETTERS

# modules with long, plain-English docstrings (their text is the "plays"; each module a speaker)
STDLIB_MODULES = (
    "textwrap", "argparse", "difflib", "heapq", "bisect", "calendar", "csv", "functools", "fractions",
    "shutil", "tempfile", "string", "pathlib", "zipfile", "tarfile", "gettext", "pprint", "ftplib",
    "smtplib", "imaplib", "inspect", "pydoc", "typing", "dataclasses", "statistics", "random", "decimal",
    "subprocess", "threading", "logging/__init__", "json/__init__", "collections/__init__",
    "email/message", "unittest/case", "http/client", "urllib/request", "xml/dom/minidom", "sqlite3/__init__",
)  # fmt: skip


def stdlib_corpus(num_speakers: int, max_lines: int = 400) -> dict[str, list[str]]:
    """``{speaker: lines}``: the docstrings of standard-library modules, parsed (never imported),
    one speaker per module, non-empty stripped lines, at most ``max_lines`` each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[str]] = {}
    for name in STDLIB_MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    lines += [ln.strip() for ln in doc.splitlines() if len(ln.strip()) > 3]
        if len(lines) >= 20:
            out[name.replace("/__init__", "").replace("/", "_").upper()] = lines[:max_lines]
        if len(out) == num_speakers:
            break
    assert len(out) == num_speakers, f"only {len(out)} stdlib modules with docstrings found"
    return out


def leaf_text(line: str) -> str:
    """A line with every character outside LEAF's Shakespeare letters made a space."""
    return "".join(c if c in LETTERS else " " for c in line)


def shakespeare_samples(lines: list[str], length: int = 80) -> tuple[list[str], list[str]]:
    """LEAF's ``shake_utils.__txt_to_data``: each line (with its newline) after ``length`` spaces,
    every window of ``length`` characters and the character after it."""
    xs, ys = [], []
    for line in lines:
        padded = " " * length + leaf_text(line) + "\n"
        for i in range(len(padded) - length):
            xs.append(padded[i : i + length])
            ys.append(padded[i + length])
    return xs, ys


def write_leaf(folder: Path, users: dict[str, dict], num_files: int, split: str, **extra) -> list[Path]:
    """``users`` ({user: {"x": [...], "y": [...]}}) spread over ``num_files`` LEAF JSON files in
    ``folder`` (created), in order; ``extra`` top-level keys (e.g. hierarchies) per file."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = list(users)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(ids)), num_files)):
        names = [ids[j] for j in chunk]
        doc = {"users": names}
        for key, values in extra.items():
            doc[key] = [values[j] for j in chunk]
        doc["num_samples"] = [len(users[u]["y"]) for u in names]
        doc["user_data"] = {u: users[u] for u in names}
        path = folder / f"all_data_{i}_niid_0_keep_0_{split}_9.json"
        path.write_text(json.dumps(doc))
        paths.append(path)
    return paths


def femnist_users(num_users: int, samples: tuple[int, int], seed: int, prefix: str = "f") -> dict[str, dict]:
    """FEMNIST-like users: ``x`` rows of 784 pixel floats in [0, 1], ``y`` class ids 0-61."""
    g = np.random.default_rng(seed)
    out = {}
    for u in range(num_users):
        n = int(g.integers(samples[0], samples[1] + 1))
        pixels = np.round(g.random((n, 784)), 3)
        out[f"{prefix}{u:04d}_{u % 97:02d}"] = {"x": pixels.tolist(), "y": g.integers(0, 62, n).tolist()}
    return out


def shakespeare_users(corpus: dict[str, list[str]], length: int = 80, test_every: int = 10):
    """LEAF Shakespeare train and test users from ``corpus``: each speaker's windows, every
    ``test_every``-th line's windows to the test split (a by-sample split, users in both)."""
    train, test = {}, {}
    for speaker, lines in corpus.items():
        held = [ln for i, ln in enumerate(lines) if i % test_every == test_every - 1]
        kept = [ln for i, ln in enumerate(lines) if i % test_every != test_every - 1]
        for split, part in ((train, kept), (test, held)):
            x, y = shakespeare_samples(part, length)
            split[speaker] = {"x": x, "y": y}
    return train, test


def write_fed_shakespeare(path: Path, clients: dict[str, list[str]]) -> None:
    """TFF's layout: ``examples/<client>/snippets``, variable-length UTF-8 strings."""
    import h5py

    with h5py.File(path, "w") as f:
        examples = f.create_group("examples")
        for cid, snippets in clients.items():
            grp = examples.create_group(cid)
            grp.create_dataset("snippets", data=snippets, dtype=h5py.string_dtype("utf-8"))


def corpus_snippets(corpus: dict[str, list[str]], lines_per_snippet: int = 3, test_every: int = 10):
    """TFF-style train/test snippets per speaker: consecutive lines joined into one snippet (a
    speech), every ``test_every``-th snippet to the test file."""
    train, test = {}, {}
    for speaker, lines in corpus.items():
        snippets = [
            "\n".join(lines[i : i + lines_per_snippet]) for i in range(0, len(lines), lines_per_snippet)
        ]
        train[speaker] = [s for i, s in enumerate(snippets) if i % test_every != test_every - 1]
        test[speaker] = [s for i, s in enumerate(snippets) if i % test_every == test_every - 1]
    return train, test


def write_pfl(path: Path, splits: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], vocab_size: int,
              pad: int = 0, unk: int | None = None) -> None:  # fmt: skip
    """pfl-research's StackOverflow layout (benchmarks/dataset/stackoverflow/download_preprocess.py)."""
    import h5py

    with h5py.File(path, "w") as f:
        f["/metadata/vocabulary_size"] = vocab_size
        f["/metadata/pad_symbol"] = pad
        f["/metadata/unk_symbol"] = vocab_size - 3 if unk is None else unk
        for split, users in splits.items():
            for uid, (inputs, targets) in users.items():
                f.create_dataset(f"/{split}/{uid}/inputs", data=np.asarray(inputs, np.int32))
                f.create_dataset(f"/{split}/{uid}/targets", data=np.asarray(targets, np.int32))


def pfl_users(num_users: int, vocab_size: int, length: int, seed: int, prefix: str = "") -> dict:
    """Token sentences as pfl writes them: ``[BOS] + words + [EOS]``, padded with 0 to
    ``length + 1``; inputs the first ``length`` ids, targets the last ``length``."""
    g = np.random.default_rng(seed)
    bos, eos = vocab_size - 2, vocab_size - 1
    out = {}
    for u in range(num_users):
        rows = []
        for _ in range(int(g.integers(1, 5))):
            words = g.integers(1, vocab_size - 3, int(g.integers(1, length)))
            seq = np.zeros(length + 1, np.int64)
            seq[: words.size + 2] = [bos, *words, eos][: length + 1]
            rows.append(seq)
        rows = np.stack(rows)
        out[f"{prefix}{u}"] = (rows[:, :-1], rows[:, 1:])
    return out
