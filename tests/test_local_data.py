"""Local image datasets (envs.local_data) and the task families that read them."""

import gzip
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_torchvision_tree

from envs import LOCAL_FAMILIES, get_family, local_data
from envs.evaluation import Job, make_pool, run_jobs
from envs.tasks import LOCAL_TRAIN, LOCAL_VAL


@pytest.fixture
def root_only_here(tmp_path, monkeypatch):
    """A second, different tree, set for this process alone; $LRCONTROL_DATA names an empty directory."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(local_data.DATA_ROOT_ENV, str(empty))
    root = write_torchvision_tree(tmp_path / "tree", n_train=120, n_test=30, seed=7)
    local_data.set_data_root(root)
    yield root
    local_data.set_data_root(None)


def test_idx_files_read_back_exactly(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = bytes([0, 0, 0x08, 3]) + np.array(images.shape, dtype=">u4").tobytes() + images.tobytes()
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "a.gz").write_bytes(gzip.compress(data))
    floats = np.linspace(-1, 1, 6).reshape(2, 3)
    (tmp_path / "f").write_bytes(bytes([0, 0, 0x0E, 2]) + np.array(floats.shape, dtype=">u4").tobytes()
                                 + floats.astype(">f8").tobytes())
    np.testing.assert_array_equal(local_data.read_idx(tmp_path / "a"), images)
    np.testing.assert_array_equal(local_data.read_idx(tmp_path / "a.gz"), images)
    np.testing.assert_array_equal(local_data.read_idx(tmp_path / "f"), floats)
    assert local_data.read_idx(tmp_path / "f").dtype == np.float64  # in this machine's byte order, not idx's big-endian


@pytest.mark.parametrize("content, message", [
    (b"", "not an idx file"),
    (b"PK\x03\x04rest", "not an idx file"),
    (bytes([0, 1, 0x08, 1]) + np.array([1], dtype=">u4").tobytes() + bytes(1), "not an idx file"),  # magic: 0 0 type n
    (bytes([0, 0, 0x08, 3, 0, 0]), "truncated"),
    (bytes([0, 0, 0x08, 1]) + np.array([5], dtype=">u4").tobytes() + bytes(4), "holds 12 bytes"),
    (bytes([0, 0, 0x08, 1]) + np.array([5], dtype=">u4").tobytes() + bytes(6), "holds 14 bytes"),
])
def test_a_broken_idx_file_is_refused_by_name(tmp_path, content, message):
    (tmp_path / "x").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        local_data.read_idx(tmp_path / "x")


def test_a_gzip_file_that_is_not_one_or_is_cut_short_is_a_value_error(tmp_path):
    """An interrupted download: a gzip error (OSError, EOFError) would escape the CLI's up-front data check."""
    whole = gzip.compress(bytes([0, 0, 0x08, 1]) + np.array([5], dtype=">u4").tobytes() + bytes(5))
    for name, content in (("plain.gz", b"hello, not gzip"), ("cut.gz", whole[: len(whole) // 2])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a readable gzip file"):
            local_data.read_idx(tmp_path / name)


def test_a_gzip_file_with_a_corrupt_body_is_a_value_error(tmp_path):
    """A gzip header over a broken deflate stream: a zlib.error (neither OSError nor EOFError) escaped."""
    whole = gzip.compress(bytes([0, 0, 0x08, 1]) + np.array([5], dtype=">u4").tobytes() + bytes(5))
    (tmp_path / "corrupt.gz").write_bytes(whole[:10] + bytes([0x07]) + whole[11:])  # a final block of reserved type
    with pytest.raises(ValueError, match="corrupt.gz is not a readable gzip file .*invalid block type"):
        local_data.read_idx(tmp_path / "corrupt.gz")


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    big = array.astype({0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code])
    return bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + big.tobytes()


@pytest.mark.parametrize("part, array, code, message", [
    ("train-images-idx3-ubyte", np.full((4, 28, 28), 0.5), 0x0D,
     r"train images are \(28, 28\) float32, not 28x28 uint8"),
    ("t10k-images-idx3-ubyte", np.zeros((4, 5, 5)), 0x08, r"t10k images are \(5, 5\) uint8, not 28x28"),
    ("train-labels-idx1-ubyte", np.array([0, 1, 2, 999]), 0x0C,
     "train labels must be integers 0-9, got int32 from 0 to 999"),
], ids=["float-pixels", "small-images", "label-999"])
def test_an_mnist_file_with_other_pixels_sizes_or_labels_is_refused_by_name(tmp_path, part, array, code, message):
    """A valid idx file that is not MNIST's: float pixels became all zeros (cast to uint8), and labels past 9 or
    images of another size failed later with a bare torch error."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-labels-idx1-ubyte"):
        good = np.zeros((4, 28, 28)) if "images" in stem else np.arange(4)
        (raw / stem).write_bytes(_idx(array, code) if stem == part else _idx(good))
    with pytest.raises(ValueError, match=message):
        local_data.load("mnist", tmp_path)
    (raw / part).unlink()
    (raw / f"{part}.gz").write_bytes(gzip.compress(_idx(array, code)))  # the same from a .gz
    with pytest.raises(ValueError, match=message):
        local_data.load("mnist", tmp_path)


def test_every_dataset_loads_from_the_torchvision_layout(local_data_root):
    for name in local_data.DATASETS:
        x, y, x_test, y_test = local_data.load(name, local_data_root)
        size = 3 * 32 * 32 if name == "cifar10" else 28 * 28
        assert x.shape == (300, size) and x_test.shape == (100, size) and x.dtype == np.uint8
        assert y.shape == (300,) and y_test.shape == (100,) and y.dtype == np.int64 and set(y) <= set(range(10))
    # CIFAR-10's python and binary releases hold the same arrays: with the python one gone, the same data loads
    py = local_data.load("cifar10", local_data_root)
    bin_only = local_data_root.parent / "bin_only"
    shutil.copytree(local_data_root / "cifar-10-batches-bin", bin_only / "cifar-10-batches-bin")
    binary = local_data.load("cifar10", bin_only)
    for a, b in zip(py, binary):
        np.testing.assert_array_equal(a, b)


def test_a_missing_root_or_dataset_says_where_it_looked(tmp_path, monkeypatch, local_data_root):
    monkeypatch.delenv(local_data.DATA_ROOT_ENV)
    with pytest.raises(FileNotFoundError, match="no data root is set: set LRCONTROL_DATA, pass --data-root"):
        local_data.load("mnist")
    with pytest.raises(FileNotFoundError, match=r"mnist: none of .*MNIST/raw/train-images-idx3-ubyte"):
        local_data.load("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="neither .*cifar-10-batches-py nor .*cifar-10-batches-bin exists"):
        local_data.load("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw is a folder torchvision makes inside its root; give the "
                                                r"root itself \(" + str(local_data_root)):
        local_data.load("kmnist", local_data_root / "MNIST" / "raw")  # a common slip: a folder inside the root
    with pytest.raises(ValueError, match="unknown local dataset 'svhn'"):
        local_data.load("svhn", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        local_data.set_data_root(tmp_path / "nope")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_crafted_cifar_pickle_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "created_by_the_payload"
    for stem in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / stem).write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="not a CIFAR-10 batch: refused to load (io|builtins).open"):
        local_data.load("cifar10", tmp_path)
    assert not marker.exists()
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": np.zeros((2, 5), np.uint8), "labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"expected 'data' \(n, 3072\)"):
        local_data.load("cifar10", tmp_path)
    for batch, message in (
        ({"data": np.full((2, 3072), 0.5), "labels": [0, 1]}, r"expected 'data' \(n, 3072\) uint8"),  # all zeros cast
        ({"data": np.zeros((2, 3072), np.uint8), "labels": 2}, r"expected 'data' \(n, 3072\) uint8 and n 'labels'"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]},
         "labels must be integers 0-9, got int64 from 0 to 10"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "its labels are not integers"),
    ):
        (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
        with pytest.raises(ValueError, match=message):
            local_data.load("cifar10", tmp_path)
    unknown_codec = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x07\x00\x00\x00nocodec\x86R."  # ("a", "nocodec")
    (folder / "data_batch_1").write_bytes(unknown_codec)
    with pytest.raises(ValueError, match="not a CIFAR-10 batch: unknown encoding: nocodec"):  # a LookupError inside
        local_data.load("cifar10", tmp_path)
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for stem in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (binary / f"{stem}.bin").write_bytes(bytes([12]) + bytes(3072))  # label 12
    with pytest.raises(ValueError, match="data_batch_1.bin: labels must be integers 0-9, got uint8 from 12 to 12"):
        local_data.load("cifar10", tmp_path / "bin")


class _Call:
    """Pickles as ``function(*args)``: what a crafted file would make the unpickler call."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("make", [
    lambda marker: _Call(os.system, f"touch {marker}"),
    lambda marker: _Call(subprocess.call, ["touch", str(marker)]),
    lambda marker: _Call(exec, f"open({str(marker)!r}, 'w').close()"),
    lambda marker: _Call(eval, f"open({str(marker)!r}, 'w').close()"),
], ids=["os.system", "subprocess.call", "exec", "eval"])
def test_a_cifar_pickle_calling_anything_but_numpy_is_refused_without_running_it(tmp_path, make):
    marker = tmp_path / "created_by_the_payload"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": make(marker), "labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 batch: refused to load"):
        local_data._cifar_py_batch(tmp_path / "data_batch_1")
    assert not marker.exists()


def test_cifar_files_of_another_shape_are_refused_by_name(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps([np.zeros((2, 3072), np.uint8), [0, 1]]))
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 batch: it holds a list, not a dict"):
        local_data._cifar_py_batch(tmp_path / "data_batch_1")
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(2 * 3073 - 5))  # an interrupted copy: a record cut short
    with pytest.raises(ValueError, match="holds 6141 bytes, not a whole number of 3073-byte CIFAR-10 records"):
        local_data._cifar_bin_batch(tmp_path / "data_batch_1.bin")


def test_the_environment_variables_root_may_start_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(local_data.DATA_ROOT_ENV, "~/data")
    local_data.set_data_root(None)
    assert local_data.data_root() == tmp_path / "data"


@pytest.mark.parametrize("labels, shown", [
    (["1", "2"], "a 1-D str32 array"), ([1.9, 2.0], "a 1-D float64 array"), ([True, False], "a 1-D bool array"),
    ([[1], [2]], "a 2-D int64 array"), (np.array([1.0, 2.0]), "a 1-D float64 array"),
], ids=["strings", "floats", "bools", "nested", "float-array"])
def test_cifar_labels_that_are_not_integers_are_refused_by_name(tmp_path, labels, shown):
    """int64 conversion turned "1", 1.9 and True into 1, and kept [[1], [2]] 2-D: all were read as labels."""
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}))
    with pytest.raises(ValueError, match=rf"data_batch_1 is not a CIFAR-10 batch: its labels are not integers "
                                         rf"\({shown}"):
        local_data._cifar_py_batch(tmp_path / "data_batch_1")


@pytest.mark.parametrize("content", [
    b"\x80\x05\x96" + (2**64 - 1).to_bytes(8, "little") + b".",  # a bytearray longer than any (OverflowError)
    b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x08" + (2**62).to_bytes(8, "little")
    + b"\x85C\x01b\x87R.",  # an array of 4 EiB (MemoryError)
], ids=["overflow", "memory"])
def test_a_cifar_pickle_sized_past_memory_is_a_value_error(tmp_path, content):
    (tmp_path / "data_batch_1").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 batch: "):
        local_data._cifar_py_batch(tmp_path / "data_batch_1")


def test_local_families_split_train_val_test(local_data_root):
    splits = get_family("mnist_mlp").data()
    n_val = min(LOCAL_VAL, 300 // 6)
    assert splits.x_train.shape == (min(LOCAL_TRAIN, 300 - n_val), 784) and splits.x_val.shape == (n_val, 784)
    assert splits.x_test.shape == (100, 784)
    assert abs(float(splits.x_train.mean())) < 1e-3  # standardised on the train split
    assert set(LOCAL_FAMILIES) == {f for f in LOCAL_FAMILIES if get_family(f).kind == "classification"}


def test_set_data_root_reaches_the_loaders_and_pool_workers(root_only_here):
    """The parent's root, not the workers' environment (a forkserver's children keep the environment it started
    with): the same task in a pool worker and in this process trains on the same data."""
    assert get_family("kmnist_cnn").data().x_test.shape[0] == 30  # not the session's 100: the cache is per root
    task = get_family("kmnist_cnn").default_task(seed=1)
    jobs = [Job(task.with_lr(0.05), "cosine"), Job(task, "constant")]
    here = run_jobs(jobs)
    pool = make_pool(1)
    try:
        there = run_jobs(jobs, pool)
    finally:
        pool.shutdown()
    assert [r.val_losses for r in there] == [r.val_losses for r in here]
    assert [r.final_test for r in there] == [r.final_test for r in here]


def test_a_task_built_after_a_new_data_root_trains_on_that_root(local_data_root, tmp_path):
    """Built tasks share their family's data per device: a new root must not be answered from that cache."""
    from envs import TorchRun

    task = get_family("kmnist_mlp").default_task(seed=0)
    assert TorchRun(task, hook=False).task.data.x_test.shape[0] == 100  # the session's tree
    local_data.set_data_root(write_torchvision_tree(tmp_path / "tree", n_train=120, n_test=30, seed=7))
    try:
        assert TorchRun(task, hook=False).task.data.x_test.shape[0] == 30
    finally:
        local_data.set_data_root(None)
    assert TorchRun(task, hook=False).task.data.x_test.shape[0] == 100


@pytest.mark.parametrize("command", [
    ["evaluate", "--families", "fashion_mnist_cnn,digits_cnn"],
    ["train", "--families", "digits_mlp,fashion_mnist_cnn", "--timesteps", "64"],
])
def test_the_cli_refuses_missing_local_data_before_any_work(tmp_path, monkeypatch, command):
    import train_controller

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [*command, "--data-root", "empty", "--out", "out", "--no-progress"]
    result = CliRunner().invoke(train_controller.cli, args)
    local_data.set_data_root(None)
    assert result.exit_code == 1, result.output
    assert "fashion_mnist_cnn: fashion_mnist: none of" in result.output and "FashionMNIST/raw" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_train_reaches_the_root_in_env_subprocesses_and_validation_workers(root_only_here, tmp_path, monkeypatch):
    """A PPO run over local families, MLP batched in this process, CNN in env subprocesses, validated on another
    local family, with the root set in this process only."""
    import train_controller as tc

    monkeypatch.chdir(tmp_path)
    cfg = tc.TrainConfig(timesteps=64, n_envs=4, n_steps=16, batch_size=32, n_epochs=1, net_arch=(16,),
                         checkpoint_every=64, eval_every=0, eval_seeds=1, families=("mnist_mlp", "kmnist_cnn"),
                         eval_families=("cifar10_mlp",), out="run")
    policy = tc.train(cfg, show_progress=False)
    assert policy.exists()
    state = tc.saved_run(tmp_path / "run")
    assert state["finished"] and state["num_timesteps"] >= 64 and state["evals"], state


def test_the_cli_names_every_local_family_it_cannot_run_and_those_it_can(root_only_here, tmp_path, monkeypatch):
    import train_controller

    monkeypatch.chdir(tmp_path)
    shutil.rmtree(root_only_here / "FashionMNIST")
    (root_only_here / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"not idx")
    result = CliRunner().invoke(train_controller.cli, ["evaluate", "--families", "local", "--data-root",
                                                       str(root_only_here), "--out", "out", "--no-progress"])
    assert result.exit_code == 1, result.output
    for name in ("fashion_mnist_mlp", "fashion_mnist_cnn"):
        assert f"{name}: fashion_mnist: none of" in result.output
    assert "kmnist_cnn: " in result.output and "t10k-labels-idx1-ubyte is not an idx file" in result.output
    assert "(found data for mnist_mlp, mnist_cnn, cifar10_mlp, cifar10_cnn)" in result.output
    assert not (tmp_path / "out").exists()
