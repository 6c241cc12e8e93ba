import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    return model, x, y


def write_torchvision_tree(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Small learnable stand-ins for MNIST, Fashion-MNIST, KMNIST and CIFAR-10, written in the files and layout of
    a torchvision download (idx files, gzipped for Fashion-MNIST; CIFAR-10's python release, pickled as NumPy 1 and
    Python 2 wrote it, and its binary release)."""
    import gzip
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)

    def images(n: int, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = templates.shape[1]
        labels = rng.integers(0, 10, n)
        x = np.clip(templates[labels] * 200 + rng.normal(0, 40, (n, size)), 0, 255)
        return x.astype(np.uint8), labels.astype(np.uint8)

    def idx(array: np.ndarray) -> bytes:
        return bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()

    for folder, gz in (("MNIST", False), ("FashionMNIST", True), ("KMNIST", False)):
        raw = root / folder / "raw"
        raw.mkdir(parents=True)
        templates = rng.random((10, 28 * 28))
        for part, n in (("train", n_train), ("t10k", n_test)):
            x, y = images(n, templates)
            for stem, array in ((f"{part}-images-idx3-ubyte", x.reshape(n, 28, 28)), (f"{part}-labels-idx1-ubyte", y)):
                data = idx(array)
                (raw / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    py, binary = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    py.mkdir()
    binary.mkdir()
    templates = rng.random((10, 3 * 32 * 32))
    for stem, n in [*((f"data_batch_{i}", n_train // 5) for i in range(1, 6)), ("test_batch", n_test)]:
        x, y = images(n, templates)
        (py / stem).write_bytes(pickle.dumps({"batch_label": stem, "labels": y.tolist(), "data": x}, protocol=2))
        (binary / f"{stem}.bin").write_bytes(np.concatenate([y[:, None], x], axis=1).tobytes())
    return root


@pytest.fixture(scope="session", autouse=True)
def local_data_root(tmp_path_factory):
    """Every test sees stand-in local datasets (the local task families need them), also in subprocesses."""
    from envs import local_data

    root = write_torchvision_tree(tmp_path_factory.mktemp("torchvision"))
    previous = os.environ.get(local_data.DATA_ROOT_ENV)
    os.environ[local_data.DATA_ROOT_ENV] = str(root)
    yield root
    local_data.set_data_root(None)
    if previous is None:
        os.environ.pop(local_data.DATA_ROOT_ENV, None)
    else:
        os.environ[local_data.DATA_ROOT_ENV] = previous
