"""scikit-learn's bundled digits (1,797 8x8 images, 64 features, 10 classes; no network needed).

The benchmark workload (benchmarks.md): a stratified 80/20 train/test split and features
standardised with the training split's mean and std, so the test set never leaks into the scaling.

Importing scikit-learn costs about 0.9 s and 90 MB of resident memory per process (it pulls in
SciPy), more than the rest of a digits run's set-up, and on a node with 64 ranks that is 5.8 GB.
So the pixels are read from the CSV file scikit-learn ships (found without importing it), and the
split, a pure function of the seed and the scikit-learn version, is computed by
``sklearn.model_selection.train_test_split`` once and kept in a small cache file
(``$HPCFED_CACHE``, else ``$XDG_CACHE_HOME/hpcfed``, else ``~/.cache/hpcfed``). An unwritable
cache only means the split is computed every time.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np

from hpcfed.rng import numpy_generator

NUM_CLASSES = 10
INPUT_SHAPE = (64,)


def _sklearn_file() -> Path:
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits dataset needs scikit-learn installed (pip install scikit-learn)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def _pixels() -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` exactly as ``sklearn.datasets.load_digits(return_X_y=True)`` returns them."""
    with gzip.open(_sklearn_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _cache_dir() -> Path:
    if os.environ.get("HPCFED_CACHE"):
        return Path(os.environ["HPCFED_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hpcfed"


def split_indices(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of the stratified 80/20 split for ``seed`` (scikit-learn's)."""
    # sklearn wants an int seed; derive it from the job seed so the split is keyed like all else.
    state = int(numpy_generator(seed, "digits-split").integers(2**31 - 1))
    version = importlib.metadata.version("scikit-learn")
    cache = _cache_dir() / f"digits-split-{state}-sklearn-{version}.npz"
    try:
        with np.load(cache) as f:
            train, test = f["train"], f["test"]
        if train.size + test.size == y.size:
            return train, test
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # absent, unreadable or torn: compute it
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(y.size), test_size=0.2, stratify=y, random_state=state)
    try:  # atomically: ranks starting together may all write it
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, train=train, test=test)
        os.replace(tmp, cache)
    except OSError:
        pass
    return train, test


def load(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(X_train, y_train, X_test, y_test)``: float32 standardised features, int64 labels."""
    X, y = _pixels()
    train, test = split_indices(y, seed)
    X_tr, X_te, y_tr, y_te = X[train], X[test], y[train], y[test]
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std[std == 0] = 1.0  # constant (border) pixels: centre them, do not divide by zero
    X_tr = ((X_tr - mean) / std).astype(np.float32)
    X_te = ((X_te - mean) / std).astype(np.float32)
    return X_tr, y_tr.astype(np.int64), X_te, y_te.astype(np.int64)


def load_federated(seed: int):
    """``data.dataset = "digits"``: the pooled split, for ``data.partition`` to divide."""
    from hpcfed.data.federated import FederatedData

    X_tr, y_tr, X_te, y_te = load(seed)
    return FederatedData.pooled(train=(X_tr, y_tr), test=(X_te, y_te), num_classes=NUM_CLASSES, name="digits")
