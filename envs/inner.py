"""The interface between the environment and an inner training run, and its plain torch implementation.

The environment only ever talks to :class:`InnerRun`: set the LR, train one epoch, read the
:class:`EpochResult`. A batched implementation (many runs of one family in one computation) sits
behind the same contract; see ``envs.batched``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from controller.signals import StepStats, StepStatsHook
from envs.tasks import Task, TaskConfig, build_task

EVAL_CHUNK = 4096
"""Validation / test passes run full-batch in chunks of this many samples."""


@dataclass(frozen=True)
class EpochResult:
    """What one epoch of an inner run reports: exactly what a deployed scheduler can see."""

    train_loss: float
    """Mean training loss over the epoch's mini-batches (weighted by batch size)."""
    val_loss: float
    """Validation loss after the epoch."""
    val_accuracy: float | None
    """Validation accuracy in [0, 1]; None for regression."""
    stats: StepStats
    """Optimizer-hook signals gathered during the epoch."""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.train_loss) and math.isfinite(self.val_loss)


class InnerRun(ABC):
    """One inner training run, advanced an epoch at a time by the environment."""

    config: TaskConfig

    @property
    @abstractmethod
    def lr(self) -> float:
        """The LR of the first param group."""

    @abstractmethod
    def set_lr(self, lr: float) -> None:
        """Set the first group's LR to ``lr``, scaling the other groups by the same factor."""

    @abstractmethod
    def run_epoch(self) -> EpochResult:
        """Train one epoch at the current LR, then evaluate on the validation split."""

    @abstractmethod
    def evaluate(self, split: str = "val") -> tuple[float, float | None]:
        """``(loss, accuracy or None)`` on ``"val"`` or ``"test"``."""


class TorchRun(InnerRun):
    """A plain PyTorch training run: tensors preloaded on the device, batches by index permutation.

    The optimizer carries a :class:`controller.signals.StepStatsHook`, the same hook the deployed
    scheduler registers, so the environment's observations are built from the same signals.

    Args:
        config: the task to run.
        device: where the model and data live.
        hook: attach the optimizer-hook signal gathering (off when a scheduler brings its own).
    """

    def __init__(self, config: TaskConfig, device: str | torch.device = "cpu", *, hook: bool = True) -> None:
        self.config = config
        self.task: Task = build_task(config, device)
        self.hook = StepStatsHook(self.task.optimizer) if hook else None

    @property
    def lr(self) -> float:
        return float(self.task.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        factor = lr / self.lr
        for group in self.task.optimizer.param_groups:
            group["lr"] = float(group["lr"]) * factor

    def train_epoch(self, after_step: Callable[[], None] | None = None) -> float:
        """One pass over the training split in a fresh random order; returns the mean loss.

        Args:
            after_step: called after every optimizer step (per-batch schedules such as OneCycle).
        """
        task, model, optimizer = self.task, self.task.model, self.task.optimizer
        x, y = task.data.x_train, task.data.y_train
        n, batch = x.shape[0], self.config.batch_size
        perm = torch.randperm(n, generator=task.generator, device=x.device)
        total = torch.zeros((), device=x.device)
        model.train()
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.detach() * idx.numel()
        return float(total) / n

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> tuple[float, float | None]:
        data = self.task.data
        if split == "val":
            x, y = data.x_val, data.y_val
        elif split == "test":
            x, y = data.x_test, data.y_test
        else:
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        model = self.task.model
        model.eval()
        loss_sum = torch.zeros((), device=x.device)
        correct = torch.zeros((), device=x.device)
        for start in range(0, x.shape[0], EVAL_CHUNK):
            xb, yb = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
            out = model(xb)
            loss_sum += self.task.loss(out, yb) * xb.shape[0]
            if self.task.family.kind == "classification":
                correct += (out.argmax(-1) == yb).sum()
        loss, acc = (torch.stack([loss_sum, correct]) / x.shape[0]).tolist()
        return loss, (acc if self.task.family.kind == "classification" else None)

    def run_epoch(self) -> EpochResult:
        train_loss = self.train_epoch()
        val_loss, val_accuracy = self.evaluate("val")
        stats = self.hook.collect() if self.hook is not None else StepStats.empty()
        return EpochResult(train_loss, val_loss, val_accuracy, stats)
