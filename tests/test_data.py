"""Datasets and partitioners (hpcfed.data)."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcfed.config import DataConfig, UserError
from hpcfed.data import load_federated, partition, synthetic
from hpcfed.data.digits import load as load_digits_split
from hpcfed.rng import numpy_generator


def rng(seed=0):
    return numpy_generator(seed, "test")


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no duplicates


# --------------------------------------------------------------------------- partitioners


def test_iid_tiny():
    parts = partition.iid(np.zeros(10, np.int64), 3, rng())
    assert [len(p) for p in parts] == [4, 3, 3]
    assert_exact_cover(parts, 10)


def test_iid_too_many_clients():
    with pytest.raises(UserError, match=r"num_clients"):
        partition.iid(np.zeros(3, np.int64), 4, rng())


def test_dirichlet_large_alpha_is_near_uniform():
    labels = np.repeat(np.arange(4), 100)
    parts = partition.dirichlet(labels, 4, 1e6, rng())
    assert_exact_cover(parts, 400)
    for p in parts:
        counts = np.bincount(labels[p], minlength=4)
        assert np.all(np.abs(counts - 25) <= 1)


def test_dirichlet_top_up_fills_every_client():
    # one class, tiny alpha: the draw gives (nearly) everything to one client; top-up gives one each
    labels = np.zeros(5, np.int64)
    parts = partition.dirichlet(labels, 5, 1e-3, rng())
    assert [len(p) for p in parts] == [1, 1, 1, 1, 1]
    assert_exact_cover(parts, 5)


def test_classes_tiny():
    labels = np.repeat(np.arange(4), 10)
    parts = partition.classes(labels, 4, 2, rng())
    assert_exact_cover(parts, 40)
    holders = np.zeros(4, int)
    for p in parts:
        held = np.unique(labels[p])
        assert len(held) == 2
        holders[held] += 1
        assert len(p) == 10  # two classes, each split evenly between its two holders: 5 + 5
    assert np.all(holders == 2)


def test_classes_errors():
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(UserError, match=r"classes_per_client"):
        partition.classes(labels, 4, 5, rng())
    with pytest.raises(UserError, match=r"cannot cover"):
        partition.classes(labels, 1, 2, rng())


def test_by_name_rejects_natural():
    with pytest.raises(UserError, match=r"data.partition"):
        partition.by_name("natural", np.zeros(4, np.int64), 2, rng())


# --------------------------------------------------------------------------- digits


def test_digits_split_stratified_and_standardised():
    X_tr, y_tr, X_te, y_te = load_digits_split(0)
    assert X_tr.dtype == np.float32 and X_tr.shape == (1437, 64) and X_te.shape == (360, 64)
    total = np.bincount(np.concatenate([y_tr, y_te]))
    assert np.all(np.abs(np.bincount(y_te) - 0.2 * total) <= 1)  # stratified 80/20
    assert np.abs(X_tr.mean(axis=0)).max() < 1e-5  # scaled with the train statistics
    std = X_tr.std(axis=0)
    assert np.allclose(std[std > 0], 1.0, atol=1e-4)
    assert abs(X_te.mean()) > 1e-4  # the test split was not re-standardised on its own


@pytest.mark.parametrize("seed", [0, 3])
def test_digits_without_importing_sklearn_equals_sklearn_cold_and_cached(tmp_path, monkeypatch, seed):
    """The pixels read from scikit-learn's CSV and the cached split are exactly what
    load_digits + train_test_split give, and a torn cache file is recomputed, not trusted."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from hpcfed.rng import numpy_generator

    X, y = load_digits(return_X_y=True)
    state = int(numpy_generator(seed, "digits-split").integers(2**31 - 1))
    X_tr, _, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=state)
    monkeypatch.setenv("HPCFED_CACHE", str(tmp_path))
    cold = load_digits_split(seed)
    [cache] = tmp_path.glob("digits-split-*.npz")
    warm = load_digits_split(seed)
    cache.write_bytes(cache.read_bytes()[:100])  # torn
    torn = load_digits_split(seed)
    for got in (cold, warm, torn):
        np.testing.assert_array_equal(got[1], y_tr)
        np.testing.assert_array_equal(got[3], y_te)
        mean, std = X_tr.mean(0), X_tr.std(0)
        std[std == 0] = 1.0
        np.testing.assert_array_equal(got[0], ((X_tr - mean) / std).astype(np.float32))


def test_digits_dataset_shapes_and_tensors():
    ds = load_federated(DataConfig(), seed=0)
    assert (ds.num_clients, ds.num_classes, ds.input_shape) == (100, 10, (64,))
    assert ds.client_sizes.dtype == np.int64 and ds.client_sizes.sum() == 1437
    X, y = ds.client(3)
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert X.shape == (ds.client_sizes[3], 64) and X.is_contiguous() and y.is_contiguous()
    assert ds.client(3)[0] is X  # precomputed: O(1), same tensors
    Xt, yt = ds.test
    assert Xt.shape == (360, 64) and yt.dtype == torch.int64
    with pytest.raises(IndexError):
        ds.client(100)


def test_digits_dirichlet_small_alpha_no_empty_client():
    ds = load_federated(DataConfig(alpha=0.05, num_clients=100), seed=0)
    assert ds.client_sizes.min() >= 1 and ds.client_sizes.sum() == 1437


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "classes"])
def test_digits_every_sample_once(kind):
    X_tr, y_tr, _, _ = load_digits_split(0)
    parts = partition.by_name(kind, y_tr, 100, numpy_generator(0, "partition"))
    assert_exact_cover(parts, len(y_tr))
    if kind == "classes":
        assert max(len(np.unique(y_tr[p])) for p in parts) <= 2
    # the dataset's clients are exactly these samples, in this order
    ds = load_federated(DataConfig(partition=kind), seed=0)
    X, y = ds.client(7)
    assert np.array_equal(X.numpy(), X_tr[parts[7]]) and np.array_equal(y.numpy(), y_tr[parts[7]])


def test_classes_partition_per_client_limit():
    ds = load_federated(DataConfig(partition="classes", classes_per_client=3), seed=1)
    for cid in range(ds.num_clients):
        assert len(torch.unique(ds.client(cid)[1])) <= 3


def test_determinism():
    a = load_federated(DataConfig(), seed=5)
    b = load_federated(DataConfig(), seed=5)
    c = load_federated(DataConfig(), seed=6)
    assert np.array_equal(a.client_sizes, b.client_sizes)
    assert all(torch.equal(a.client(i)[0], b.client(i)[0]) for i in range(a.num_clients))
    assert torch.equal(a.test[0], b.test[0])
    assert not np.array_equal(a.client_sizes, c.client_sizes)


def test_digits_fast_enough():
    import time

    load_federated(DataConfig(), seed=0)  # imports
    t = time.perf_counter()
    load_federated(DataConfig(), seed=1)
    assert time.perf_counter() - t < 0.5  # ~20 ms here; generous for loaded CI machines


# --------------------------------------------------------------------------- synthetic


def test_synthetic_client_alone_equals_client_in_all():
    users = synthetic.SyntheticUsers(30, 1.0, 1.0, seed=3)
    X_all, y_all = users.pooled_train()
    start = int(users.train_sizes[:17].sum())
    X, y = users.train(17)
    assert np.array_equal(X, X_all[start : start + len(X)]) and np.array_equal(
        y, y_all[start : start + len(y)]
    )
    ds = load_federated(DataConfig(dataset="synthetic", partition="natural", num_clients=30), seed=3)
    Xc, yc = ds.client(17)
    assert np.array_equal(Xc.numpy(), X) and np.array_equal(yc.numpy(), y)


def test_synthetic_shapes_and_sizes():
    cfg = DataConfig(dataset="synthetic", partition="natural", num_clients=100_000)
    ds = load_federated(cfg, seed=0)  # 100k users: only sizes are computed
    assert (ds.num_classes, ds.input_shape, ds.num_clients) == (10, (60,), 100_000)
    total = synthetic.user_sizes(100_000, 0)
    assert total.min() >= 50 and total.max() <= synthetic.MAX_SAMPLES
    assert 90 <= np.median(total) <= 120  # floor(lognormal(4, 2)) + 50: median e^4 + 50 ~ 104
    assert np.array_equal(ds.client_sizes, total - total // 5)
    X, y = ds.client(99_999)
    assert X.shape == (ds.client_sizes[99_999], 60) and X.dtype == torch.float32
    assert y.min() >= 0 and y.max() < 10
    Xt, _ = ds.test
    assert len(Xt) == (total[:200] // 5).sum()


def test_synthetic_pooled_partition():
    ds = load_federated(DataConfig(dataset="synthetic", partition="iid", num_clients=20), seed=0)
    users = synthetic.SyntheticUsers(20, 1.0, 1.0, seed=0)
    assert ds.client_sizes.sum() == users.train_sizes.sum()
    assert np.ptp(ds.client_sizes) <= 1


# --------------------------------------------------------------------------- h5


def write_tff(path, clients, variant="pixels", num_classes_attr=None):
    """clients: {id: n}; returns {id: (x, y)} as written."""
    g = np.random.default_rng(len(clients))
    written = {}
    with h5py.File(path, "w") as f:
        if num_classes_attr is not None:
            f.attrs["num_classes"] = num_classes_attr
        ex = f.create_group("examples")
        for cid, n in clients.items():
            grp = ex.create_group(cid)
            if variant == "pixels":
                x = g.random((n, 28, 28), dtype=np.float32)
            else:
                x = g.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
            y = g.integers(0, 5, n).astype(np.int32)
            grp.create_dataset(variant, data=x)
            grp.create_dataset("label", data=y)
            written[cid] = (x, y)
    return written


@pytest.fixture
def tff_files(tmp_path):
    def make(variant="pixels"):
        train = {"c2": 6, "c0": 4, "c1": 5, "c3": 7}
        w_tr = write_tff(tmp_path / f"train_{variant}.h5", train, variant)
        w_te = write_tff(tmp_path / f"test_{variant}.h5", {"t0": 3, "t1": 2}, variant)
        return str(tmp_path / f"train_{variant}.h5"), str(tmp_path / f"test_{variant}.h5"), w_tr, w_te

    return make


def h5_cfg(train, test, **kw):
    return DataConfig(
        dataset="h5", path=train, test_path=test, **{"partition": "natural", "num_clients": 3, **kw}
    )


def test_h5_natural_pixels(tff_files):
    train, test, w_tr, w_te = tff_files("pixels")
    ds = load_federated(h5_cfg(train, test), seed=0)
    assert ds.input_shape == (1, 28, 28) and ds.num_clients == 3
    assert list(ds.client_sizes) == [4, 5, 6]  # sorted ids c0, c1, c2; c3 not used
    X, y = ds.client(1)
    assert X.shape == (5, 1, 28, 28) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(X.numpy()[:, 0], w_tr["c1"][0]) and np.array_equal(y.numpy(), w_tr["c1"][1])
    Xt, yt = ds.test
    assert np.array_equal(Xt.numpy()[:, 0], np.concatenate([w_te["t0"][0], w_te["t1"][0]]))
    assert np.array_equal(yt.numpy(), np.concatenate([w_te["t0"][1], w_te["t1"][1]]))
    # used train clients (c3 is not) and the test file
    all_labels = np.concatenate([w_tr[c][1] for c in ("c0", "c1", "c2")] + [v[1] for v in w_te.values()])
    assert ds.num_classes == all_labels.max() + 1


def test_h5_image_and_dirichlet(tff_files):
    train, test, w_tr, _ = tff_files("image")
    ds = load_federated(h5_cfg(train, test), seed=0)
    assert ds.input_shape == (3, 8, 8)
    X, _ = ds.client(0)
    expected = w_tr["c0"][0].transpose(0, 3, 1, 2).astype(np.float32) / 255
    assert np.allclose(X.numpy(), expected) and X.is_contiguous()
    dd = load_federated(h5_cfg(train, test, partition="dirichlet", num_clients=4), seed=0)
    assert dd.client_sizes.sum() == 22 and dd.client_sizes.min() >= 1  # all 4 file clients pooled


def test_h5_client_reads_only_its_group(tff_files, monkeypatch):
    train, test, _, _ = tff_files("pixels")
    ds = load_federated(h5_cfg(train, test), seed=0)
    seen = []
    original = h5py.Group.__getitem__

    def spy(self, name):
        obj = original(self, name)
        seen.append(obj.name)
        return obj

    monkeypatch.setattr(h5py.Group, "__getitem__", spy)
    ds.client(2)
    assert seen and all(s == "/examples" or s.startswith("/examples/c2") for s in seen)


def test_h5_num_classes_attribute(tmp_path):
    write_tff(tmp_path / "a.h5", {"x": 3}, num_classes_attr=62)
    write_tff(tmp_path / "b.h5", {"y": 3})
    ds = load_federated(h5_cfg(str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), num_clients=1), seed=0)
    assert ds.num_classes == 62


def test_h5_errors(tmp_path, tff_files):
    train, test, _, _ = tff_files("pixels")
    missing = str(tmp_path / "nope.h5")
    with pytest.raises(UserError, match=r"nope.h5"):
        load_federated(h5_cfg(missing, test), seed=0)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(UserError, match=r"junk.h5.*not an HDF5"):
        load_federated(h5_cfg(str(junk), test), seed=0)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(Path(train).read_bytes()[:600])
    with pytest.raises(UserError, match=r"truncated.h5"):
        load_federated(h5_cfg(str(truncated), test), seed=0)
    no_examples = tmp_path / "noex.h5"
    with h5py.File(no_examples, "w") as f:
        f.create_group("clients")
    with pytest.raises(UserError, match=r"noex.h5.*'examples'"):
        load_federated(h5_cfg(str(no_examples), test), seed=0)
    no_label = tmp_path / "nolabel.h5"
    with h5py.File(no_label, "w") as f:
        f.create_dataset("examples/a/pixels", data=np.zeros((2, 28, 28), np.float32))
    with pytest.raises(UserError, match=r"examples/a has no dataset 'label'"):
        load_federated(h5_cfg(str(no_label), test, num_clients=1), seed=0)
    with pytest.raises(UserError, match=r"data.num_clients"):
        load_federated(h5_cfg(train, test, num_clients=5), seed=0)
    for exc_msg in ("nope.h5", "junk.h5"):  # one line, no traceback material in the message
        try:
            load_federated(h5_cfg(str(tmp_path / exc_msg), test), seed=0)
        except UserError as exc:
            assert "\n" not in str(exc)


# --------------------------------------------------------------------------- mnist / cifar10


def write_idx(path, arr, gz=False):
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        Path(str(path) + ".gz").write_bytes(gzip.compress(data))
    else:
        Path(path).write_bytes(data)


def make_mnist(root, n_train=40, n_test=10):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y = np.arange(n_train) % 10
    write_idx(raw / "train-images-idx3-ubyte", x)
    write_idx(raw / "train-labels-idx1-ubyte", y)
    write_idx(raw / "t10k-images-idx3-ubyte", x[:n_test], gz=True)  # the .gz variant
    write_idx(raw / "t10k-labels-idx1-ubyte", y[:n_test], gz=True)
    return x, y


def test_mnist_local(tmp_path):
    x, y = make_mnist(tmp_path)
    ds = load_federated(
        DataConfig(dataset="mnist", path=str(tmp_path), partition="iid", num_clients=4), seed=0
    )
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.client_sizes.sum() == 40
    Xt, yt = ds.test
    assert Xt.shape == (10, 1, 28, 28) and np.array_equal(yt.numpy(), y[:10])
    expected = (x[:10] / 255.0 - 0.1307) / 0.3081
    assert np.allclose(Xt.numpy()[:, 0], expected, atol=1e-5)
    X, y = ds.client(2)
    assert X.dtype == torch.float32 and X.is_contiguous() and X.shape == (ds.client_sizes[2], 1, 28, 28)


def test_mnist_errors(tmp_path):
    with pytest.raises(UserError, match=r"no such directory"):
        load_federated(DataConfig(dataset="mnist", path=str(tmp_path / "absent"), partition="iid"), seed=0)
    make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03rubbish")
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte.*magic"):
        load_federated(
            DataConfig(dataset="mnist", path=str(tmp_path), partition="iid", num_clients=2), seed=0
        )


def cifar_batches(n=6):
    g = np.random.default_rng(1)
    return [(g.integers(0, 256, (n, 3072), dtype=np.uint8), list(g.integers(0, 10, n))) for _ in range(6)]


def make_cifar_bin(root):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    batches = cifar_batches()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, (data, labels) in zip(names, batches, strict=True):
        rec = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
        (folder / f"{name}.bin").write_bytes(rec.tobytes())
    return batches


def make_cifar_py(root, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    batches = cifar_batches()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, (data, labels) in zip(names, batches, strict=True):
        d = {b"batch_label": b"x", b"labels": [int(v) for v in labels], b"data": data, b"filenames": [b"a"]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
    return batches


def check_cifar(ds, batches):
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.client_sizes.sum() == 30
    Xt, yt = ds.test
    data, labels = batches[5]
    assert np.array_equal(yt.numpy(), labels)
    mean = np.array([0.4914, 0.4822, 0.4465])[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    expected = (data.reshape(-1, 3, 32, 32) / 255.0 - mean) / std
    assert np.allclose(Xt.numpy(), expected, atol=1e-5)


def cifar_cfg(root):
    return DataConfig(dataset="cifar10", path=str(root), partition="iid", num_clients=3)


def test_cifar_bin(tmp_path):
    batches = make_cifar_bin(tmp_path)
    check_cifar(load_federated(cifar_cfg(tmp_path), seed=0), batches)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_py(tmp_path, protocol):
    batches = make_cifar_py(tmp_path, protocol)
    check_cifar(load_federated(cifar_cfg(tmp_path), seed=0), batches)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_py_rejects_disallowed_global(tmp_path):
    make_cifar_py(tmp_path)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_3.*(posix|os)\.system.*not allowed"):
        load_federated(cifar_cfg(tmp_path), seed=0)
    assert not marker.exists()


def test_cifar_missing(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-batches"):
        load_federated(cifar_cfg(tmp_path), seed=0)
    make_cifar_bin(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    with pytest.raises(UserError, match=r"test_batch.bin: no such file"):
        load_federated(cifar_cfg(tmp_path), seed=0)
