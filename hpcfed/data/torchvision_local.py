"""MNIST and CIFAR-10 read from a local torchvision root, without torchvision and never downloading.

torchvision does not import beside our pinned torch, and compute nodes often have no network, so
we read the files torchvision leaves on disk ourselves:

- MNIST: ``{root}/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, the IDX format of
  LeCun et al. (http://yann.lecun.com/exdb/mnist/): big-endian magic ``0x0000080D`` (D = number of
  dimensions, 0x08 = uint8), D big-endian uint32 sizes, then the bytes.
- CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html), either version:
  ``{root}/cifar-10-batches-py/{data_batch_1..5,test_batch}``: pickled dicts with ``data``
  (N x 3072 uint8, R then G then B planes of 32x32) and ``labels``; unpickled with a restricted
  Unpickler that resolves only the numpy array constructors those files use, so a crafted file
  cannot run code. Or ``{root}/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``: records of
  one label byte and 3072 pixel bytes.

The loaders return uint8 images; :func:`mnist_inputs` / :func:`cifar10_inputs` normalise them per
channel with the usual training-set statistics. The caller gathers the uint8 images into client
order first and converts once, so the float copy is made once (CIFAR-10 train: 614 MB as float32).
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np

from hpcfed.config import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# CIFAR-10 training-set per-channel mean and std (the often-copied (0.2023, 0.1994, 0.2010) is the
# std of per-image means, not of pixels).
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
NUM_CLASSES = 10
MNIST_SHAPE = (1, 28, 28)
CIFAR10_SHAPE = (3, 32, 32)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _root(path: str | None) -> Path:
    root = Path(path or "")
    if not path or not root.is_dir():
        raise UserError(f"data.path = {path}: no such directory; expected a local torchvision root")
    return root


# --------------------------------------------------------------------------- MNIST


def _read_maybe_gz(p: Path) -> bytes:
    if p.is_file():
        return p.read_bytes()
    gz = p.with_name(p.name + ".gz")
    if gz.is_file():
        try:
            return gzip.decompress(gz.read_bytes())
        except (OSError, EOFError) as exc:
            raise UserError(f"{gz}: not a valid gzip file ({exc})") from None
    raise UserError(f"{p}: no such file (nor .gz); expected torchvision's MNIST layout {{root}}/MNIST/raw/")


def read_idx(p: Path, ndim: int) -> np.ndarray:
    """An IDX file of uint8 with ``ndim`` dimensions."""
    data = _read_maybe_gz(p)
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise UserError(f"{p}: not an IDX uint8 file with {ndim} dimensions (bad magic number)")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", ndim, 4))
    if len(data) - header != int(np.prod(shape)):
        raise UserError(f"{p}: IDX header says shape {shape} but the file holds {len(data) - header} bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_mnist(path: str | None) -> Arrays:
    """``(X_train, y_train, X_test, y_test)``, X uint8 [N, 1, 28, 28]: see :func:`mnist_inputs`."""
    root = _root(path)
    raw = root / "MNIST" / "raw"
    if not raw.is_dir():
        raise UserError(f"data.path = {path}: no folder MNIST/raw; expected torchvision's MNIST layout")
    out = []
    for split in ("train", "t10k"):
        images = read_idx(raw / f"{split}-images-idx3-ubyte", 3)
        labels = read_idx(raw / f"{split}-labels-idx1-ubyte", 1)
        if len(images) != len(labels):
            raise UserError(f"{raw}: {split} has {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() >= NUM_CLASSES:
            raise UserError(f"{raw}: {split} labels outside 0..{NUM_CLASSES - 1}")
        out += [images[:, None], labels.astype(np.int64)]
    return tuple(out)


def mnist_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 1, 28, 28] -> normalised float32."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    x -= np.float32(MNIST_MEAN)
    x /= np.float32(MNIST_STD)
    return x


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch pickle may name: numpy's array reconstruction helpers."""
    from numpy._core import multiarray, numeric  # numpy 2; numpy.core is a deprecated alias

    allowed: dict[tuple[str, str], object] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct  # protocol <= 4 arrays
        allowed[(mod, "scalar")] = multiarray.scalar  # numpy scalars
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer  # protocol 5 arrays
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 writes bytes in protocol 2 as _codecs.encode(str, "latin1"): a pure function.
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :func:`_allowed_globals`; anything else (os.system, eval...) is refused."""

    _allowed = None

    def find_class(self, module: str, name: str) -> object:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def _read_cifar_py(p: Path) -> tuple[np.ndarray, np.ndarray]:
    if not p.is_file():
        raise UserError(f"{p}: no such file; expected torchvision's CIFAR-10 layout")
    try:
        # latin1: the batches were pickled by Python 2 (torchvision does the same)
        d = _RestrictedUnpickler(io.BytesIO(p.read_bytes()), encoding="latin1").load()
    except Exception as exc:  # any malformed or malicious pickle is the user's file problem
        raise UserError(f"{p}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(d, dict):
        raise UserError(f"{p}: not a CIFAR-10 python batch (expected a dict with 'data' and 'labels')")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{p}: 'data' is not an N x 3072 uint8 array")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{p}: 'labels' is not a list of integers") from None
    if len(y) != len(data):
        raise UserError(f"{p}: {len(data)} images but {len(y)} labels")
    return data, y


def _read_cifar_bin(p: Path) -> tuple[np.ndarray, np.ndarray]:
    if not p.is_file():
        raise UserError(f"{p}: no such file; expected torchvision's CIFAR-10 layout")
    raw = np.fromfile(p, np.uint8)
    if raw.size % 3073:
        raise UserError(f"{p}: {raw.size} bytes is not a whole number of 3,073-byte CIFAR-10 records")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:], rec[:, 0].astype(np.int64)


def cifar10_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, 32, 32] -> per-channel normalised float32."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    x -= CIFAR10_MEAN[:, None, None]
    x /= CIFAR10_STD[:, None, None]
    return x


def load_cifar10(path: str | None) -> Arrays:
    """``(X_train, y_train, X_test, y_test)``, X uint8 [N, 3, 32, 32]: see :func:`cifar10_inputs`."""
    root = _root(path)
    py, binary = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    if py.is_dir():  # the version torchvision's CIFAR10 downloads
        read, names = _read_cifar_py, (CIFAR10_TRAIN, CIFAR10_TEST)
        folder = py
    elif binary.is_dir():
        read, names = (
            _read_cifar_bin,
            ([n + ".bin" for n in CIFAR10_TRAIN], [n + ".bin" for n in CIFAR10_TEST]),
        )
        folder = binary
    else:
        raise UserError(
            f"data.path = {path}: neither cifar-10-batches-py/ nor cifar-10-batches-bin/; "
            "expected torchvision's CIFAR-10 layout"
        )
    out = []
    for split in names:
        parts = [read(folder / n) for n in split]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise UserError(f"{folder}: labels outside 0..{NUM_CLASSES - 1}")
        out += [data.reshape(-1, 3, 32, 32), labels]  # R, G, B planes: already channels first
    return tuple(out)


def _pooled(name: str, arrays: Arrays, to_input):
    from hpcfed.data.federated import FederatedData

    X_tr, y_tr, X_te, y_te = arrays
    return FederatedData.pooled(
        train=(X_tr, y_tr), test=(X_te, y_te), num_classes=NUM_CLASSES, transform=to_input, name=name
    )


def load_mnist_federated(seed: int, path: str | None = None):
    """``data.dataset = "mnist"``: the pooled training set (uint8 until split), ``data.path`` the root."""
    return _pooled("mnist", load_mnist(path), mnist_inputs)


def load_cifar10_federated(seed: int, path: str | None = None):
    """``data.dataset = "cifar10"``: the pooled training set (uint8 until split), ``data.path`` the root."""
    return _pooled("cifar10", load_cifar10(path), cifar10_inputs)
