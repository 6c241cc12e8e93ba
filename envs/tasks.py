"""The inner task suite: small, real training problems that run offline in milliseconds per epoch.

A *family* (:class:`TaskFamily`) is a dataset, a model factory and the optimizer defaults a
practitioner would type. :meth:`TaskFamily.sample` draws one *task* (:class:`TaskConfig`) from it —
width/depth, batch size, optimizer, initial LR (log-uniform over three decades around the default),
epoch budget and seed — and :func:`build_task` turns a task into tensors on a device and a model.

Families are split once into :data:`TRAIN_FAMILIES` (the only ones a policy is trained on),
:data:`VALIDATION_FAMILIES` (used to select and evaluate policies, never to train them) and
:data:`TEST_FAMILIES` (never used to train, select or tune anything: a policy's numbers on them are
the closest this repository has to tasks nobody has seen). :data:`LOCAL_FAMILIES` read image
datasets from the user's own torchvision download and stand outside all three. Every family has
train / val / test splits; a controller sees train and val only, test is for reporting.

Data sources: scikit-learn's bundled sets, MNIST-1D generated locally
(``mnist1d.data.make_dataset``; never its downloading ``get_dataset``), synthetic generators, and
for the local families MNIST, Fashion-MNIST, KMNIST and CIFAR-10 files already on disk
(:mod:`envs.local_data`). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
import numbers
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from envs import local_data

OptimizerName = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("sgd", "adam", "adamw")
SGD_MOMENTUM = 0.9
ADAMW_WEIGHT_DECAY = 0.01
LR_DECADES = 3.0
"""Sampled initial LRs span this many decades, centred on the family default (×10^±1.5)."""


# --------------------------------------------------------------------------------------------------
# Data: every loader returns CPU float32 tensors, cached per process, split 60/20/20 unless the
# source has its own test set. Inputs are standardised on the train split; regression targets too.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors of one dataset (CPU; moved to a device by build_task)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device) -> Splits:
        return Splits(*(t.to(device) for t in vars(self).values()))


def _split(x: np.ndarray, y: np.ndarray, *, regression: bool, seed: int = 0) -> Splits:
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    parts = [(x[:n_train], y[:n_train]), (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
             (x[n_train + n_val :], y[n_train + n_val :])]
    return _standardize(parts, regression)


def _standardize(parts: list[tuple[np.ndarray, np.ndarray]], regression: bool) -> Splits:
    x_tr = parts[0][0]
    axes = tuple(range(x_tr.ndim - 1)) if x_tr.dtype.kind == "f" else None
    out: list[Tensor] = []
    if axes is not None:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        # a feature constant in training (an image border no training image inks) carries nothing the model could
        # learn: 0 in every split, not blown up by 1e6 where a validation or test sample differs
        varies = std > 0
    if regression:
        y_mean, y_std = parts[0][1].mean(), parts[0][1].std() + 1e-6
    for x, y in parts:
        if axes is not None:
            x = np.where(varies, (x - mean) / (std + 1e-6), 0.0)
        xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32 if axes is not None else torch.long)
        yt = (torch.as_tensor((y - y_mean) / y_std, dtype=torch.float32).reshape(-1, 1)
              if regression else torch.as_tensor(y, dtype=torch.long))
        out += [xt, yt]
    return Splits(*out)


@functools.lru_cache(maxsize=None)
def digits() -> Splits:
    """scikit-learn digits: 1797 8×8 images, 10 classes (flattened to 64 features)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split(data.data.astype(np.float64), data.target, regression=False)


@functools.lru_cache(maxsize=None)
def breast_cancer() -> Splits:
    """scikit-learn breast cancer: 569 samples, 30 features, 2 classes."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return _split(data.data, data.target, regression=False)


@functools.lru_cache(maxsize=None)
def diabetes() -> Splits:
    """scikit-learn diabetes: 442 samples, 10 features, a real-valued target (regression)."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    return _split(data.data, data.target, regression=True)


@functools.lru_cache(maxsize=None)
def wine() -> Splits:
    """scikit-learn wine: 178 samples, 13 features, 3 classes."""
    from sklearn.datasets import load_wine

    data = load_wine()
    return _split(data.data, data.target, regression=False)


@functools.lru_cache(maxsize=None)
def mnist1d() -> Splits:
    """MNIST-1D (Greydanus 2020), 5000 length-40 signals, 10 classes, generated locally.

    ``make_dataset`` reseeds Python's and numpy's global RNGs; their states are restored here.
    The library's own 4000/1000 split is kept as (train+val)/test; val is the last 1000 of train.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x, y = data["x"].astype(np.float64), data["y"]
    parts = [(x[:3000], y[:3000]), (x[3000:], y[3000:]), (data["x_test"].astype(np.float64), data["y_test"])]
    return _standardize(parts, regression=False)


@functools.lru_cache(maxsize=None)
def friedman() -> Splits:
    """Friedman #1 (scikit-learn generator): 2000 samples, 10 features (5 informative), noise 1."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    return _split(x, y, regression=True)


@functools.lru_cache(maxsize=None)
def teacher() -> Splits:
    """Teacher–student regression: y = a fixed random 2-layer tanh network of 20 inputs, + noise."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 20))
    w1, w2 = rng.standard_normal((20, 32)) / math.sqrt(20), rng.standard_normal((32, 1)) / math.sqrt(32)
    y = np.tanh(x @ w1) @ w2 + 0.1 * rng.standard_normal((2000, 1))
    return _split(x, y[:, 0], regression=True)


@functools.lru_cache(maxsize=None)
def blobs() -> Splits:
    """Synthetic 4-class classification (scikit-learn ``make_classification``), 2000 × 20, 10 informative."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, n_redundant=4, n_classes=4,
                               n_clusters_per_class=2, class_sep=1.0, flip_y=0.02, random_state=2)
    return _split(x, y, regression=False)


@functools.lru_cache(maxsize=None)
def moons() -> Splits:
    """Two interleaving half circles (scikit-learn ``make_moons``): 4000 × 2, noise 0.25, 2 classes."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=4000, noise=0.25, random_state=5)
    return _split(x, y, regression=False)


TOKEN_VOCAB, TOKEN_LEN = 8, 16


@functools.lru_cache(maxsize=None)
def tokens_mode() -> Splits:
    """Synthetic token task: 1500 sequences of 16 tokens over 8 symbols; class = the most frequent symbol."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(TOKEN_VOCAB, 0.7), size=1500)
    x = np.stack([rng.choice(TOKEN_VOCAB, size=TOKEN_LEN, p=p) for p in probs])
    y = np.array([np.bincount(row, minlength=TOKEN_VOCAB).argmax() for row in x])
    return _split(x, y, regression=False)


@functools.lru_cache(maxsize=None)
def adding() -> Splits:
    """The adding problem (Hochreiter & Schmidhuber): 1500 sequences of length 16 with 2 channels
    (a value in [0, 1] and a marker); the target is the sum of the two marked values (regression)."""
    rng = np.random.default_rng(4)
    n, length = 1500, 16
    values = rng.random((n, length))
    markers = np.zeros((n, length))
    for i in range(n):
        markers[i, rng.choice(length, size=2, replace=False)] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = (values * markers).sum(axis=1)
    return _split(x, y, regression=True)


LOCAL_TRAIN, LOCAL_VAL = 10_000, 2_000
"""Samples a local image family trains and validates on: a fixed draw from the dataset's training set, so an
epoch costs seconds on a CPU. The whole test set is kept for the test split. The four loaders below cache what
they read per data root."""


def _local(name: str) -> Splits:
    return _local_at(name, local_data.data_root())


@functools.lru_cache(maxsize=None)
def _local_at(name: str, root: Path | None) -> Splits:
    x, y, x_test, y_test = local_data.load(name, root)
    perm = np.random.default_rng(0).permutation(len(x))
    n_val = min(LOCAL_VAL, len(x) // 6)
    val, train = perm[:n_val], perm[n_val : n_val + LOCAL_TRAIN]
    parts = [(x[train], y[train]), (x[val], y[val]), (x_test, y_test)]
    return _standardize([(xs.astype(np.float32), ys) for xs, ys in parts], regression=False)


def mnist() -> Splits:
    """MNIST from a local torchvision download (:mod:`envs.local_data`): 28×28 digits, 10 classes."""
    return _local("mnist")


def fashion_mnist() -> Splits:
    """Fashion-MNIST from a local torchvision download: 28×28 clothing images, 10 classes."""
    return _local("fashion_mnist")


def kmnist() -> Splits:
    """KMNIST from a local torchvision download: 28×28 cursive Japanese characters, 10 classes."""
    return _local("kmnist")


def cifar10() -> Splits:
    """CIFAR-10 from a local torchvision download: 32×32 colour images, 10 classes (3072 values, channel-major)."""
    return _local("cifar10")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def mlp(n_in: int, n_out: int, width: int, depth: int) -> nn.Module:
    """``depth`` hidden ReLU layers of ``width`` units (depth 0: a linear model)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if depth else n_in, n_out))
    return nn.Sequential(*layers)


class Conv2dNet(nn.Module):
    """``depth`` 3×3 conv layers (``width``, 2·``width``, … channels), a 2×2 max-pool and a linear head.

    Inputs: flattened ``channels``×``side``×``side`` images, channel by channel.
    """

    def __init__(self, side: int, n_out: int, width: int, depth: int, channels: int = 1) -> None:
        super().__init__()
        chans = [channels] + [width * 2**i for i in range(max(depth, 1))]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(chans[-1] * (side // 2) ** 2, n_out)
        self.side, self.channels = side, channels

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.reshape(-1, self.channels, self.side, self.side)))


class Conv1dNet(nn.Module):
    """Strided 1-D convolutions (kernel 5, stride 2) over a single-channel signal, then a linear head."""

    def __init__(self, length: int, n_out: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for _ in range(depth):
            layers += [nn.Conv1d(c_in, width, 5, stride=2, padding=2), nn.ReLU()]
            c_in, length = width, (length + 1) // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(c_in * length, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)))


class RecurrentNet(nn.Module):
    """A GRU or LSTM over a sequence; the last hidden state feeds a linear head.

    Inputs ``(batch, length)`` (one channel) or ``(batch, length, channels)``; ``stride`` > 1
    averages that many neighbouring time steps first (shorter sequences train faster).
    """

    def __init__(self, n_in: int, n_out: int, width: int, depth: int, cell: str = "gru", stride: int = 1) -> None:
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(n_in, width, num_layers=depth, batch_first=True)
        self.head = nn.Linear(width, n_out)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(-1)
        if self.stride > 1:
            x = F.avg_pool1d(x.transpose(1, 2), self.stride).transpose(1, 2)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a 2× MLP, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: CUDA's fused kernels have
        # non-deterministic backward passes, and at these sizes the plain form costs the same.
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class AttentionNet(nn.Module):
    """A small transformer encoder with mean pooling.

    Token inputs (``vocab`` > 0): an embedding. Real-valued signals (``vocab`` = 0): the signal is cut
    into patches of ``patch`` samples, each linearly embedded. Learned positional embeddings.
    """

    def __init__(self, n_out: int, width: int, depth: int, *, length: int, vocab: int = 0, patch: int = 1,
                 heads: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Embedding(vocab, width) if vocab else nn.Linear(patch, width)
        self.pos = nn.Parameter(0.02 * torch.randn(length // patch, width))
        self.blocks = nn.Sequential(*[AttentionBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.embed, nn.Linear):
            x = x.reshape(x.shape[0], -1, self.patch)
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(h).mean(1))


# --------------------------------------------------------------------------------------------------
# Families and tasks
# --------------------------------------------------------------------------------------------------

ModelFactory = Callable[[int, int], nn.Module]
"""(width, depth) → a freshly initialised model."""


@dataclass(frozen=True)
class TaskFamily:
    """A dataset, a model factory and the defaults a practitioner would type for them."""

    name: str
    """Registry key, e.g. ``"digits_mlp"``."""
    data: Callable[[], Splits]
    """Cached loader of the train / val / test splits."""
    model: ModelFactory
    """(width, depth) → model."""
    kind: Literal["classification", "regression"]
    """Cross-entropy with accuracy, or mean squared error."""
    default_optimizer: OptimizerName
    """The optimizer a practitioner would pick for this task."""
    default_lrs: tuple[tuple[OptimizerName, float], ...] = (("sgd", 0.01), ("adam", 1e-3), ("adamw", 1e-3))
    """The LR a practitioner would type, per optimizer."""
    widths: tuple[int, ...] = (32, 64, 128)
    """Hidden widths sampled per episode."""
    depths: tuple[int, ...] = (1, 2)
    """Depths sampled per episode."""
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    """Batch sizes sampled per episode."""
    epochs: tuple[int, int] = (10, 40)
    """Epoch budget range (inclusive) sampled per episode."""

    def __reduce__(self) -> str | tuple[Any, ...]:
        """A registered family pickles as its name (its data and model factories are lambdas), so a built task, an
        inner run and an env pickle too; another family pickles field by field."""
        if FAMILIES.get(self.name) is self:
            return (get_family, (self.name,))
        return super().__reduce__()

    def default_lr(self, optimizer: OptimizerName | None = None) -> float:
        """The practitioner's default LR for ``optimizer`` (default: the family's optimizer)."""
        return dict(self.default_lrs)[optimizer or self.default_optimizer]

    def default_task(self, seed: int = 0) -> TaskConfig:
        """The task a practitioner would set up: middle width/depth/batch, default optimizer and LR."""
        mid = lambda xs: xs[len(xs) // 2]  # noqa: E731
        return TaskConfig(self.name, seed, self.default_optimizer, self.default_lr(), round(sum(self.epochs) / 2),
                          mid(self.batch_sizes), mid(self.widths), mid(self.depths))

    def sample(self, rng: np.random.Generator, *, lr_multiplier: float | None = None,
               epochs: tuple[int, int] | None = None) -> TaskConfig:
        """Draw a task: architecture, batch size, optimizer, epoch budget and seed.

        The initial LR is ``default_lr(optimizer) × 10^u`` with u ~ U(-1.5, 1.5), or exactly
        ``default × lr_multiplier`` when one is given (evaluation protocols). The epoch budget is drawn
        from the family's range, or from ``epochs`` (inclusive) when one is given, after the family's own draws: the
        task is the one drawn without ``epochs``, with another budget.
        """
        check_lr_multiplier(lr_multiplier)
        epochs = check_epoch_range(epochs)
        optimizer = OPTIMIZERS[int(rng.integers(len(OPTIMIZERS)))]
        u = rng.uniform(-LR_DECADES / 2, LR_DECADES / 2)
        lr = self.default_lr(optimizer) * (10.0**u if lr_multiplier is None else lr_multiplier)
        task = TaskConfig(
            family=self.name,
            seed=int(rng.integers(2**31 - 1)),
            optimizer=optimizer,
            lr=float(lr),
            epochs=int(rng.integers(self.epochs[0], self.epochs[1] + 1)),
            batch_size=int(rng.choice(self.batch_sizes)),
            width=int(rng.choice(self.widths)),
            depth=int(rng.choice(self.depths)),
        )
        if epochs is not None:  # drawn last: every other draw stays the family's own
            task = replace(task, epochs=int(rng.integers(epochs[0], epochs[1] + 1)))
        return task


@dataclass(frozen=True)
class TaskConfig:
    """One inner training run, fully determined (data order and init come from ``seed``)."""

    family: str
    seed: int
    optimizer: OptimizerName
    lr: float
    """Initial learning rate."""
    epochs: int
    """Epoch budget."""
    batch_size: int
    width: int
    depth: int

    def __post_init__(self) -> None:
        get_family(self.family)  # an unknown family is named, with the known ones
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        for name, low in (("epochs", 2), ("batch_size", 1), ("width", 1), ("depth", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    def with_lr(self, lr: float) -> TaskConfig:
        return replace(self, lr=float(lr))


FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        # ---- training families -------------------------------------------------------------------
        TaskFamily("digits_mlp", digits, lambda w, d: mlp(64, 10, w, d), "classification", "adam",
                   widths=(32, 64, 128, 256), depths=(1, 2, 3)),
        TaskFamily("mnist1d_cnn", mnist1d, lambda w, d: Conv1dNet(40, 10, w, d), "classification", "adam",
                   widths=(8, 16, 32), depths=(2,), batch_sizes=(64, 128)),
        TaskFamily("mnist1d_gru", mnist1d, lambda w, d: RecurrentNet(1, 10, w, d, "gru", stride=4),
                   "classification", "adam", widths=(16, 32), depths=(1,), batch_sizes=(128, 256), epochs=(10, 30)),
        TaskFamily("tokens_attention", tokens_mode, lambda w, d: AttentionNet(TOKEN_VOCAB, w, d, length=TOKEN_LEN,
                   vocab=TOKEN_VOCAB), "classification", "adamw", widths=(16, 32), depths=(1, 2),
                   batch_sizes=(64, 128), epochs=(10, 30)),
        TaskFamily("friedman_mlp", friedman, lambda w, d: mlp(10, 1, w, d), "regression", "adam",
                   widths=(32, 64, 128), depths=(1, 2, 3)),
        TaskFamily("breast_cancer_mlp", breast_cancer, lambda w, d: mlp(30, 2, w, d), "classification", "sgd",
                   widths=(16, 32, 64), depths=(0, 1, 2), batch_sizes=(16, 32, 64)),
        TaskFamily("adding_lstm", adding, lambda w, d: RecurrentNet(2, 1, w, d, "lstm"), "regression", "adam",
                   widths=(16, 32), depths=(1,), batch_sizes=(64, 128), epochs=(10, 30)),
        TaskFamily("teacher_mlp", teacher, lambda w, d: mlp(20, 1, w, d), "regression", "sgd",
                   widths=(16, 64, 256), depths=(1, 2, 3)),
        # ---- validation families -----------------------------------------------------------------
        TaskFamily("digits_cnn", digits, lambda w, d: Conv2dNet(8, 10, w, d), "classification", "sgd",
                   widths=(4, 8, 16), depths=(1, 2), batch_sizes=(64, 128)),
        TaskFamily("mnist1d_mlp", mnist1d, lambda w, d: mlp(40, 10, w, d), "classification", "adam",
                   widths=(64, 128, 256), depths=(1, 2, 3)),
        TaskFamily("mnist1d_attention", mnist1d, lambda w, d: AttentionNet(10, w, d, length=40, patch=8),
                   "classification", "adamw", widths=(16, 32), depths=(1, 2), batch_sizes=(64, 128),
                   epochs=(10, 30)),
        TaskFamily("tokens_gru", tokens_mode, lambda w, d: nn.Sequential(
                   nn.Embedding(TOKEN_VOCAB, 16), RecurrentNet(16, TOKEN_VOCAB, w, d, "gru")),
                   "classification", "adam", widths=(16, 32), depths=(1,), batch_sizes=(64, 128), epochs=(10, 30)),
        TaskFamily("diabetes_mlp", diabetes, lambda w, d: mlp(10, 1, w, d), "regression", "sgd",
                   widths=(16, 32, 64), depths=(1, 2), batch_sizes=(16, 32)),
        TaskFamily("blobs_mlp", blobs, lambda w, d: mlp(20, 4, w, d), "classification", "sgd",
                   widths=(32, 64, 128), depths=(1, 2, 3)),
        # ---- test families: chosen before any policy saw them; for reporting only --------------------
        TaskFamily("wine_mlp", wine, lambda w, d: mlp(13, 3, w, d), "classification", "adam",
                   widths=(16, 32, 64), depths=(1, 2), batch_sizes=(8, 16, 32)),
        TaskFamily("digits_gru", digits, lambda w, d: nn.Sequential(  # an image read row by row
                   nn.Unflatten(1, (8, 8)), RecurrentNet(8, 10, w, d, "gru")), "classification", "adam",
                   widths=(16, 32), depths=(1,), batch_sizes=(32, 64), epochs=(10, 30)),
        TaskFamily("moons_mlp", moons, lambda w, d: mlp(2, 2, w, d), "classification", "sgd",  # 150-300 steps/epoch
                   widths=(16, 32, 64), depths=(2, 3), batch_sizes=(8, 16), epochs=(10, 20)),
        # ---- local families: image datasets from the user's own torchvision download ---------------
        TaskFamily("mnist_mlp", mnist, lambda w, d: mlp(784, 10, w, d), "classification", "adam",
                   widths=(128, 256), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 30)),
        TaskFamily("mnist_cnn", mnist, lambda w, d: Conv2dNet(28, 10, w, d), "classification", "sgd",
                   widths=(4, 8), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 20)),
        TaskFamily("fashion_mnist_mlp", fashion_mnist, lambda w, d: mlp(784, 10, w, d), "classification", "adam",
                   widths=(128, 256), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 30)),
        TaskFamily("fashion_mnist_cnn", fashion_mnist, lambda w, d: Conv2dNet(28, 10, w, d), "classification",
                   "sgd", widths=(4, 8), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 20)),
        TaskFamily("kmnist_mlp", kmnist, lambda w, d: mlp(784, 10, w, d), "classification", "adam",
                   widths=(128, 256), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 30)),
        TaskFamily("kmnist_cnn", kmnist, lambda w, d: Conv2dNet(28, 10, w, d), "classification", "sgd",
                   widths=(4, 8), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 20)),
        TaskFamily("cifar10_mlp", cifar10, lambda w, d: mlp(3072, 10, w, d), "classification", "adam",
                   widths=(128, 256), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 30)),
        TaskFamily("cifar10_cnn", cifar10, lambda w, d: Conv2dNet(32, 10, w, d, channels=3), "classification",
                   "sgd", widths=(8, 16), depths=(1, 2), batch_sizes=(64, 128), epochs=(10, 20)),
    )
}

TRAIN_FAMILIES: tuple[str, ...] = (
    "digits_mlp", "mnist1d_cnn", "mnist1d_gru", "tokens_attention",
    "friedman_mlp", "breast_cancer_mlp", "adding_lstm", "teacher_mlp",
)
"""Families a policy may be trained on."""

VALIDATION_FAMILIES: tuple[str, ...] = (
    "digits_cnn", "mnist1d_mlp", "mnist1d_attention", "tokens_gru", "diabetes_mlp", "blobs_mlp",
)
"""Held-out families: used to select and evaluate policies, never to train them."""

TEST_FAMILIES: tuple[str, ...] = ("wine_mlp", "digits_gru", "moons_mlp")
"""Families for reporting only: no policy is trained or selected on them, and no design choice looks at them.

They reach beyond the training distribution on purpose: a dataset no other family uses (wine), a seen
dataset under a model no family pairs it with (digits read row by row by a GRU), and epochs of
150–300 optimizer steps (moons, small batches), 3–6× longer than any training family's.
"""

LOCAL_FAMILIES: tuple[str, ...] = (
    "mnist_mlp", "mnist_cnn", "fashion_mnist_mlp", "fashion_mnist_cnn", "kmnist_mlp", "kmnist_cnn",
    "cifar10_mlp", "cifar10_cnn",
)
"""Families on image datasets read from the user's own torchvision download (:mod:`envs.local_data`; nothing is
downloaded). Absent here, they trained, selected and tuned nothing in this repository: on your machine they are
tasks the shipped policy has never seen (``train_controller.py evaluate --families local --data-root DIR``), or
more families to train on."""

assert set(TRAIN_FAMILIES) | set(VALIDATION_FAMILIES) | set(TEST_FAMILIES) | set(LOCAL_FAMILIES) == set(FAMILIES)
assert not set(TRAIN_FAMILIES) & set(VALIDATION_FAMILIES)
assert not (set(TRAIN_FAMILIES) | set(VALIDATION_FAMILIES)) & set(TEST_FAMILIES)
assert not (set(TRAIN_FAMILIES) | set(VALIDATION_FAMILIES) | set(TEST_FAMILIES)) & set(LOCAL_FAMILIES)


def check_lr_multiplier(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a positive finite number (a multiple of a default LR)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not 0 < float(value) < math.inf):
        raise ValueError(f"lr_multiplier must be a positive finite number (or None), got {value!r}")


def check_epoch_range(value: object) -> tuple[int, int] | None:
    """``value`` as an epoch budget range ``(low, high)``, inclusive, 2 <= low <= high (None stays None): the
    environment's ``reset()`` trains the first epoch, so a budget needs a second for the agent to set.

    Raises:
        ValueError: anything else, named.
    """
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
            or not 2 <= value[0] <= value[1]):
        raise ValueError(f"an epoch budget range must be two ints (low, high) with 2 <= low <= high, got {value!r}")
    return int(value[0]), int(value[1])


def get_family(name: str) -> TaskFamily:
    """The family called ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}") from None


def check_local_data(families: Sequence[str]) -> None:
    """Read the local datasets ``families`` need now (:mod:`envs.local_data`), so that a missing or broken one is
    reported before any work: all of them at once, and which local families could run.

    Raises:
        ValueError: some local family's data is missing or unreadable (each one named, with the reader's reason).
    """
    problems, ready = [], []
    for name in dict.fromkeys(f for f in families if f in LOCAL_FAMILIES):
        try:
            get_family(name).data()
            ready.append(name)
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"{name}: {err}")
    if problems:
        found = f"\n(found data for {', '.join(ready)})" if ready else ""
        raise ValueError("\n".join(problems) + found)


@dataclass
class Task:
    """A built task: model and data on a device, loss, and an optimizer at the task's initial LR."""

    config: TaskConfig
    family: TaskFamily
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Splits
    generator: torch.Generator
    """Drives the data order of this task only (never the global RNG)."""

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.family.kind == "classification":
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)


def make_optimizer(name: OptimizerName, params: list[nn.Parameter] | object, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, Adam, or AdamW with weight decay 0.01 (fused kernels: ~25 % faster
    epochs than the per-parameter loop on a small CPU model)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, fused=True)  # type: ignore[arg-type]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)  # type: ignore[arg-type]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY, fused=True)  # type: ignore[arg-type]
    raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")


def _data_on(family: str, device: str) -> Splits:
    """A family's splits on ``device``, cached (a local family's per data root: :func:`local_data.set_data_root`
    may change it)."""
    return _data_at(family, device, local_data.data_root() if family in LOCAL_FAMILIES else None)


@functools.lru_cache(maxsize=32)
def _data_at(family: str, device: str, root: Path | None) -> Splits:
    return FAMILIES[family].data().to(torch.device(device))


def build_task(config: TaskConfig, device: str | torch.device = "cpu") -> Task:
    """Build the model (initialised from ``config.seed``), data on ``device`` and optimizer.

    The global torch RNG is left untouched: initialisation runs inside ``torch.random.fork_rng``.
    """
    family = get_family(config.family)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = family.model(config.width, config.depth)
    model = model.to(device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed + 1)
    return Task(config, family, model, optimizer, _data_on(config.family, str(device)), generator)
