"""Image datasets read from a local torchvision download: MNIST, Fashion-MNIST, KMNIST and CIFAR-10.

Nothing is downloaded and torchvision is not imported. The files are read where torchvision's
``download=True`` leaves them under one root directory::

    ROOT/MNIST/raw/train-images-idx3-ubyte      (and train-labels-idx1-ubyte, t10k-*; or the .gz archives)
    ROOT/FashionMNIST/raw/...                   (the same four files)
    ROOT/KMNIST/raw/...                         (the same four files)
    ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
    ROOT/cifar-10-batches-bin/data_batch_1.bin ... data_batch_5.bin, test_batch.bin   (the binary release)

The root is the last :func:`set_data_root` in this process, else the ``LRCONTROL_DATA`` environment
variable. CIFAR-10's python release is a pickle; it is read by an unpickler that builds only NumPy
arrays, dicts, lists, strings and numbers and refuses anything else, so a crafted file runs no code.

Example:
    >>> from envs import local_data
    >>> local_data.set_data_root("~/data")             # where torchvision.datasets.MNIST(root=...) put it
    >>> x_train, y_train, x_test, y_test = local_data.load("mnist")
    >>> x_train.shape, x_train.dtype
    ((60000, 784), dtype('uint8'))
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

try:  # NumPy 2
    from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]
    from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]
except ImportError:  # NumPy 1
    from numpy.core.multiarray import _reconstruct  # type: ignore[attr-defined,no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[attr-defined,no-redef]

DATA_ROOT_ENV = "LRCONTROL_DATA"
"""Environment variable naming the root directory of a local torchvision download."""

MNIST_LIKE = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
"""Dataset name → torchvision's folder name; all three share MNIST's file names and idx format."""

DATASETS: tuple[str, ...] = (*MNIST_LIKE, "cifar10")
"""Every dataset :func:`load` reads."""

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_RECORD = 1 + 3 * 32 * 32  # the binary release: one label byte, then the image channel by channel
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_root: Path | None = None


def set_data_root(path: str | os.PathLike[str] | None) -> None:
    """Read local datasets under ``path`` from now on in this process (None: back to ``$LRCONTROL_DATA``).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
    """
    global _root
    if path is None:
        _root = None
        return
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"the local data root {str(root)!r} is not a directory")
    _root = root.resolve()


def data_root() -> Path | None:
    """The root local datasets are read from, or None when neither :func:`set_data_root` nor ``$LRCONTROL_DATA``
    gave one."""
    if _root is not None:
        return _root
    value = os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An array from an idx file (the MNIST format; ``.gz`` read as gzip).

    Raises:
        ValueError: the file is not idx, or is shorter or longer than its header says.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # not gzip, cut short (an interrupted download), corrupt
            raise ValueError(f"{path} is not a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (its first bytes are {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its {ndim}-dimension header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + dtype.itemsize * int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path} holds {len(raw)} bytes where its header ({shape}, {dtype.name}) says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load(name: str, root: str | os.PathLike[str] | None = None,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of a local dataset under ``root`` (default: :func:`data_root`):
    images flattened to uint8 rows (CIFAR-10: 3072 values, channel by channel, as ``reshape(-1, 3, 32, 32)``
    expects), labels int64.

    Raises:
        ValueError: an unknown name, or a file that is not what it should be.
        FileNotFoundError: no root is set, or the dataset is not under it; the message says where it looked.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown local dataset {name!r}; known: {', '.join(DATASETS)}")
    root = Path(root).expanduser() if root is not None else data_root()
    if root is None:
        raise FileNotFoundError(f"the {name} families read a local torchvision download, and no data root is set: "
                                f"set {DATA_ROOT_ENV}, pass --data-root to train_controller.py or call "
                                "envs.local_data.set_data_root with the directory you gave torchvision as root=. "
                                "Nothing is downloaded.")
    try:
        return _cifar10(root) if name == "cifar10" else _mnist_like(name, root)
    except FileNotFoundError as err:
        top = root
        while top.name in _INSIDE_ROOT and top.parent != top:
            top = top.parent
        if top == root:
            raise
        raise FileNotFoundError(f"{err}. {root} is a folder torchvision makes inside its root; give the root itself "
                                f"({top})") from None


_INSIDE_ROOT = {*MNIST_LIKE.values(), "raw", "cifar-10-batches-py", "cifar-10-batches-bin"}


def _mnist_like(name: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / MNIST_LIKE[name] / "raw"
    arrays = []
    for stem in _MNIST_FILES:
        path = _first_existing(folder / stem, folder / f"{stem}.gz", dataset=name)
        arrays.append(read_idx(path))
    x_train, y_train, x_test, y_test = arrays
    for x, y, part in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{folder}: {part} images {x.shape} and labels {y.shape} do not match")
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28):
            raise ValueError(f"{folder}: {part} images are {x.shape[1:]} {x.dtype.name}, not 28x28 uint8 (an "
                             f"{MNIST_LIKE[name]} file holds bytes)")
        _check_labels(y, f"{folder}: {part} labels")
    return (x_train.reshape(len(x_train), -1), y_train.astype(np.int64),
            x_test.reshape(len(x_test), -1), y_test.astype(np.int64))


def _check_labels(y: np.ndarray, what: str) -> None:
    """Ten classes: a label outside 0..9 is a file that is not what it should be (it would fail later, nameless)."""
    if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() > 9)):
        shown = f"from {y.min()} to {y.max()}" if len(y) else "none"
        raise ValueError(f"{what} must be integers 0-9, got {y.dtype.name} {shown}")


def _first_existing(*paths: Path, dataset: str) -> Path:
    for path in paths:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{dataset}: none of {', '.join(map(str, paths))} exists (torchvision.datasets with "
                            "download=True writes them there; nothing is downloaded here)")


def _cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    py, binary = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    if py.is_dir():
        parts = [_cifar_py_batch(_first_existing(py / stem, dataset="cifar10"))
                 for stem in (*_CIFAR_TRAIN, "test_batch")]
    elif binary.is_dir():
        parts = [_cifar_bin_batch(_first_existing(binary / f"{stem}.bin", dataset="cifar10"))
                 for stem in (*_CIFAR_TRAIN, "test_batch")]
    else:
        raise FileNotFoundError(f"cifar10: neither {py} nor {binary} exists (torchvision.datasets.CIFAR10 with "
                                "download=True writes the first; nothing is downloaded here)")
    x_train = np.concatenate([x for x, _ in parts[:-1]])
    y_train = np.concatenate([y for _, y in parts[:-1]])
    return x_train, y_train, parts[-1][0], parts[-1][1]


def _cifar_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise ValueError(f"{path} holds {raw.size} bytes, not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records")
    records = raw.reshape(-1, _CIFAR_RECORD)
    _check_labels(records[:, 0], f"{path}: labels")
    return np.ascontiguousarray(records[:, 1:]), records[:, 0].astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds NumPy arrays and plain containers; any other global is refused before it is looked up."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the name in files NumPy 1 wrote (CIFAR's own)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5's out-of-band form
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 spells bytes when Python 3 writes it
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only NumPy arrays are read") from None


def _cifar_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, LookupError,
            OverflowError, MemoryError) as err:  # the last two: a length or an array shape past any memory
        raise ValueError(f"{path} is not a CIFAR-10 batch: {str(err) or type(err).__name__}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 \
            or not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected 'data' (n, 3072) uint8 and n 'labels'")
    try:  # no dtype= here: it would turn "7", b"7", 7.9 and True into 7, 7, 7 and 1
        y = np.asarray(labels)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 batch: its labels are not integers ({err})") from None
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{path} is not a CIFAR-10 batch: its labels are not integers (a {y.ndim}-D {y.dtype.name} "
                         "array)")
    _check_labels(y, f"{path}: labels")
    return data, y.astype(np.int64)
