"""The one place that turns training signals into the controller's observation vector.

Both the training environment (``envs.LRControlEnv``) and the deployed scheduler
(``controller.PolicyScheduler``) call :class:`FeatureBuilder`, so the inputs a policy was trained on
and the inputs it sees in a user's run cannot drift apart. It uses only what a deployed scheduler can
see: the user's per-epoch mean training loss, validation loss and (optional) validation accuracy,
the optimizer-hook signals of :mod:`controller.signals`, the current and initial LR, the optimizer
kind and the fraction of the epoch budget used.

Every feature is scale-free or a log, clipped to ``[-CLIP, CLIP]``, and finite for any input
(0, 1e30, NaN or inf losses included); a value that has not been observed yet is 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from controller.signals import StepStats

CLIP = 5.0
"""Every feature lies in [-CLIP, CLIP]."""

FEATURE_NAMES: tuple[str, ...] = (
    "progress",  # epochs done / epoch budget, in [0, 1]
    "log2_lr_rel_initial",  # log2(lr / initial lr) / 4
    "log10_lr",  # (log10(lr) + 3) / 1.5: absolute LR, read beside the optimizer kind
    "opt_sgd",  # 1 for SGD (any momentum)
    "opt_adam",  # 1 for Adam-like adaptive optimizers (Adam, AdamW, NAdam, RAdam, Adamax)
    "log_train_rel_first",  # ln(train loss / first train loss) / 2
    "log_val_rel_first",  # ln(val loss / first val loss) / 2
    "log_val_rel_best",  # 2 ln(val loss / best val loss so far), >= 0: a blow-up shows here
    "log_val_over_train",  # ln(val loss / train loss): the generalisation gap
    "dlog_train",  # 5 ln(train loss / previous train loss): one-epoch change
    "dlog_val",  # 5 ln(val loss / previous val loss)
    "val_accuracy",  # validation accuracy in [0, 1], 0 when not given
    "has_accuracy",  # 1 when validation accuracy is given
    "log_grad_norm_rel_first",  # ln(mean grad norm / first epoch's) / 2
    "grad_norm_cv",  # spread of per-step grad norms: std / mean
    "grad_norm_trend",  # 2 ln(second-half mean grad norm / first-half mean) within the epoch
    "log10_update_ratio",  # (log10(||Δw|| / ||w||) + 3) / 1.5, per step
    "grad_cos",  # cosine of successive gradients, in [-1, 1]
    "log10_steps",  # log10(optimizer steps in the epoch) / 2
)
N_FEATURES = len(FEATURE_NAMES)

SGD_LIKE = frozenset({"SGD"})
ADAM_LIKE = frozenset({"Adam", "AdamW", "NAdam", "RAdam", "Adamax"})
_ADAM_LIKE_LOWER = frozenset(n.lower() for n in ADAM_LIKE)


def optimizer_kind(optimizer: torch.optim.Optimizer | str) -> str:
    """``"sgd"``, ``"adam"`` or ``"other"`` from an optimizer (or its class name); a subclass of a torch optimizer
    (``class MyAdamW(torch.optim.AdamW)``) is of its base's kind."""
    names = [optimizer] if isinstance(optimizer, str) else [c.__name__ for c in type(optimizer).__mro__]
    for name in names:
        if name in SGD_LIKE or name.lower() == "sgd":
            return "sgd"
        if name in ADAM_LIKE or name.lower() in _ADAM_LIKE_LOWER:
            return "adam"
    return "other"


def _finite_positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0.0


def _log_ratio(a: float | None, b: float | None) -> float:
    """ln(a / b), with non-finite ``a`` read as "far worse" (+CLIP) and an unknown ``b`` as 0."""
    if b is None or not _finite_positive(b):
        return 0.0
    if a is None:
        return 0.0
    if not math.isfinite(a):
        return CLIP  # NaN or inf loss: as bad as it gets
    return math.log(max(a, 1e-30) / b)


class FeatureBuilder:
    """Stateful feature computation for one training run.

    Call :meth:`observe` once per decision (after each epoch); it returns the observation vector and
    updates the run's reference values (first, best and previous losses). The state is primitives
    only (:meth:`state_dict`), so a scheduler holding a builder reloads with ``weights_only=True``.

    Args:
        total_epochs: the epoch budget of the run (progress = epochs done / budget).
        initial_lr: the LR the run started with (the reference for the relative-LR feature).
        optimizer: the optimizer or its kind (``"sgd"``, ``"adam"``, ``"other"``).

    Example:
        >>> fb = FeatureBuilder(total_epochs=30, initial_lr=1e-3, optimizer="adam")
        >>> obs = fb.observe(epoch=1, lr=1e-3, train_loss=2.1, val_loss=2.0, stats=hook.collect())
        >>> obs.shape
        (19,)
    """

    def __init__(
        self, total_epochs: int, initial_lr: float, optimizer: torch.optim.Optimizer | str
    ) -> None:
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        if not (math.isfinite(initial_lr) and initial_lr > 0):
            raise ValueError(f"initial_lr must be a positive finite number, got {initial_lr}")
        self.total_epochs = int(total_epochs)
        self.initial_lr = float(initial_lr)
        self.optimizer_kind = (
            optimizer if optimizer in ("sgd", "adam", "other") else optimizer_kind(optimizer)
        )
        self.first_train: float | None = None
        self.first_val: float | None = None
        self.first_grad_norm: float | None = None
        self.best_val: float | None = None
        self.prev_train: float | None = None
        self.prev_val: float | None = None
        self.last_val: float = math.nan
        """The validation loss of the latest observe() call (the safety rule reads it)."""
        self.best_before_last: float | None = None
        """The best validation loss before the latest one (the safety rule compares against it)."""

    def observe(
        self,
        *,
        epoch: int,
        lr: float,
        train_loss: float | None,
        val_loss: float,
        val_accuracy: float | None = None,
        stats: StepStats | None = None,
    ) -> np.ndarray:
        """Observation after ``epoch`` completed epochs; updates the reference values.

        Args:
            epoch: epochs completed so far (1 at the first decision).
            lr: the LR the epoch ran with (of the first param group).
            train_loss: mean training loss over the epoch, or None if the user gives none.
            val_loss: validation loss after the epoch.
            val_accuracy: validation accuracy in [0, 1], if defined for the task.
            stats: the optimizer-hook summary of the epoch (:class:`StepStats`).

        Returns:
            float32 array of shape ``(N_FEATURES,)`` in ``[-CLIP, CLIP]``.
        """
        stats = stats or StepStats.empty()
        if self.first_train is None and _finite_positive(train_loss):
            self.first_train = train_loss
        if self.first_val is None and _finite_positive(val_loss):
            self.first_val = val_loss
        if self.first_grad_norm is None and _finite_positive(stats.grad_norm_mean):
            self.first_grad_norm = stats.grad_norm_mean
        lr_ok = _finite_positive(lr)
        has_acc = val_accuracy is not None and math.isfinite(val_accuracy)
        opt = self.optimizer_kind
        obs = [
            min(epoch / self.total_epochs, 1.0),
            math.log2(lr / self.initial_lr) / 4.0 if lr_ok else -CLIP,
            (math.log10(lr) + 3.0) / 1.5 if lr_ok else -CLIP,
            1.0 if opt == "sgd" else 0.0,
            1.0 if opt == "adam" else 0.0,
            _log_ratio(train_loss, self.first_train) / 2.0,
            _log_ratio(val_loss, self.first_val) / 2.0,
            2.0 * max(_log_ratio(val_loss, self.best_val), 0.0),
            _log_ratio(val_loss, train_loss if _finite_positive(train_loss) else None),
            5.0 * _log_ratio(train_loss, self.prev_train),
            5.0 * _log_ratio(val_loss, self.prev_val),
            float(val_accuracy) if has_acc else 0.0,  # type: ignore[arg-type]
            1.0 if has_acc else 0.0,
            _log_ratio(stats.grad_norm_mean, self.first_grad_norm) / 2.0,
            stats.grad_norm_cv,
            2.0 * stats.grad_norm_trend,
            (math.log10(max(stats.update_ratio, 1e-30)) + 3.0) / 1.5
            if math.isfinite(stats.update_ratio)
            else 0.0,
            stats.grad_cos,
            math.log10(max(stats.steps, 1)) / 2.0,
        ]
        self.last_val, self.best_before_last = val_loss, self.best_val
        if _finite_positive(val_loss) and (self.best_val is None or val_loss < self.best_val):
            self.best_val = val_loss
        self.prev_train = train_loss if _finite_positive(train_loss) else self.prev_train
        self.prev_val = val_loss if _finite_positive(val_loss) else self.prev_val
        # NaN reads as 0; everything else is clipped to [-CLIP, CLIP]
        return np.array([0.0 if math.isnan(x) else min(max(x, -CLIP), CLIP) for x in obs], dtype=np.float32)

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: loads with ``torch.load(..., weights_only=True)``."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(vars(self))
        if unknown:
            raise ValueError(f"unknown FeatureBuilder state keys: {sorted(unknown)}")
        vars(self).update(state)
