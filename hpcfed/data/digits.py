"""scikit-learn's bundled digits (1,797 8x8 images, 64 features, 10 classes; no network needed).

The benchmark workload (benchmarks.md): a stratified 80/20 train/test split and features
standardised with the training split's mean and std, so the test set never leaks into the scaling.
"""

from __future__ import annotations

import numpy as np

from hpcfed.rng import numpy_generator

NUM_CLASSES = 10
INPUT_SHAPE = (64,)


def load(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(X_train, y_train, X_test, y_test)``: float32 standardised features, int64 labels."""
    # Imported here: sklearn.model_selection costs ~0.1 s and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    # sklearn wants an int seed; derive it from the job seed so the split is keyed like all else.
    state = int(numpy_generator(seed, "digits-split").integers(2**31 - 1))
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=state)
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std[std == 0] = 1.0  # constant (border) pixels: centre them, do not divide by zero
    X_tr = ((X_tr - mean) / std).astype(np.float32)
    X_te = ((X_te - mean) / std).astype(np.float32)
    return X_tr, y_tr.astype(np.int64), X_te, y_te.astype(np.int64)
