"""``PolicyScheduler``: a trained LR controller as a drop-in ``torch.optim`` scheduler."""

from __future__ import annotations

import math
import operator
import sys
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, LRScheduler, SequentialLR

from controller.actions import next_lr
from controller.checkpoint import load_policy
from controller.features import FEATURE_NAMES, FeatureBuilder
from controller.policy import PolicyNet
from controller.signals import StepStatsHook

_STATE_VERSION = 1
_DISTRIBUTED = torch.distributed.is_available()
_COMPOSITE_STEPS = {cls.step.__code__: cls.__name__ for cls in (SequentialLR, ChainedScheduler)}
"""The ``step`` code of the torch schedulers that step others with no metric: a PolicyScheduler they step never
decides."""


_LAST_DECIDER: weakref.WeakKeyDictionary[Optimizer, weakref.ref[PolicyScheduler]] = weakref.WeakKeyDictionary()
"""The PolicyScheduler that last decided for each optimizer: two live ones taking turns both move its LR."""

_RECURSIVE_UNDO = SequentialLR.recursive_undo.__code__
"""What ``SequentialLR.__init__`` calls on every scheduler it is given (``hasattr(s, "_schedulers")``)."""


def _composite_error(name: str) -> TypeError:
    return TypeError(
        f"PolicyScheduler cannot run inside {name}: it decides from the validation loss, which {name} never passes "
        "(torch refuses ReduceLROnPlateau there for the same reason), so it would keep the LR constant. It replaces the "
        "whole schedule. For a warm-up, step a warm-up scheduler yourself for the first epochs, then build "
        "PolicyScheduler(optimizer, total_epochs=<epochs left>) and call its step(val_loss, train_loss=...) once per epoch"
    )


def _as_float(value: Any, name: str) -> float | None:
    if type(value) is float:  # the usual case, first: a decision is a few dozen cheap steps like this one
        return value
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or type(value).__name__ in ("bool", "bool_"):  # float() takes "0.5", True, np.True_
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real number, got a {value.dtype} tensor")
        return float(value.detach().item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _per_group(value: Any, n_groups: int, name: str) -> tuple[list[float], bool]:
    """One bound per param group from a number or a sequence of them; also whether a sequence was given."""
    listed = isinstance(value, (list, tuple)) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim > 0)
    values: list[Any] = list(value) if listed else [value] * n_groups
    if len(values) != n_groups:
        raise ValueError(f"expected {n_groups} values for {name}, one per param group, got {len(values)}")
    out = [_as_float(v, name) for v in values]
    if None in out:
        raise ValueError(f"{name} must be a number or one per param group, got {value!r}")
    return out, listed  # type: ignore[return-value]  # no None left


def _ranks() -> int:
    """Processes in torch.distributed's default group (1 when it is not in use)."""
    if _DISTRIBUTED and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _collective_device(model_device: torch.device) -> torch.device:
    """Where the scheduler's collectives run: the CPU, or under NCCL this rank's GPU (the model's, which is right
    even when the script never called ``torch.cuda.set_device``)."""
    if torch.distributed.get_backend() != "nccl":
        return torch.device("cpu")
    return model_device if model_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def _mean_over_ranks(
    val_loss: float, train: float | None, accuracy: float | None, device: torch.device
) -> tuple[float, float | None, float | None]:
    """The validation loss, training loss and accuracy averaged over the ranks (None where no rank gave one)."""
    values = [val_loss, train or 0.0, train is not None, accuracy or 0.0, accuracy is not None]
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    val_sum, train_sum, train_n, accuracy_sum, accuracy_n = summed.tolist()
    return (
        val_sum / _ranks(),
        train_sum / train_n if train_n else None,
        accuracy_sum / accuracy_n if accuracy_n else None,
    )


def _check_total_epochs(total_epochs: object) -> int:
    """``total_epochs`` as an int (NumPy integers too); a clear error for anything but a positive integer."""
    try:
        n = operator.index(total_epochs)  # type: ignore[arg-type]  # refused below when it is no integer
    except TypeError:
        n = 0
    if isinstance(total_epochs, bool) or n < 1:
        raise ValueError(f"total_epochs must be a positive int (or None to let a trainer set it), got {total_epochs!r}")
    return n


def _check_plain_state(state: dict[str, Any]) -> None:
    """The plain values of a :meth:`PolicyScheduler.state_dict` have the types and ranges the scheduler keeps."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def rates(v: Any) -> bool:
        return isinstance(v, list) and all(number(x) and x >= 0 for x in v)

    checks = {
        "last_epoch": count, "_step_count": count,
        "total_epochs": lambda v: v is None or (count(v) and v >= 1),
        "initial_lr": lambda v: number(v) and v > 0,
        "base_lrs": rates, "_last_lr": rates, "min_lrs": rates,
        "max_lrs": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and x > 0 for x in v),  # inf: none
        "_warned_nonfinite": lambda v: isinstance(v, bool),
        "_pending_train_sum": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),  # NaN allowed
        "_pending_train_weight": lambda v: number(v) and v >= 0,
        "_raw_lrs": lambda v: rates(v) and (not v or v[0] > 0),  # other groups may be frozen at 0
        "_later_bounds": lambda v: (isinstance(v, list) and len(v) == 2 and number(v[0]) and v[0] >= 0
                                    and isinstance(v[1], (int, float)) and v[1] > 0 and v[1] >= v[0]),  # inf: none
    }
    bad = [f"{key}={state[key]!r}" for key, ok in checks.items() if key in state and not ok(state[key])]
    if bad:
        raise ValueError(f"malformed PolicyScheduler state: {', '.join(bad)}")


class PolicyScheduler(LRScheduler):
    """Sets the learning rate once per epoch with a policy trained by reinforcement learning.

    After each epoch, call ``step(val_loss, train_loss=...)``. The scheduler builds an observation
    from the losses, the optimizer-hook signals it gathers itself (gradient norm statistics,
    update-to-weight ratio, alignment of successive gradients; see :mod:`controller.signals`), the LR
    and the fraction of ``total_epochs`` done; the policy answers ``a`` ∈ [-1, 1] and every param
    group's LR is multiplied by the same factor 2^a (ratios between groups kept), subject to the
    safety rule of :mod:`controller.actions` the policy was trained with (LR within
    [min_ratio, max_ratio] × initial, a cut when the validation loss blows up) and to ``min_lr`` /
    ``max_lr``.

    ``step()`` with no metric (what Hugging Face Trainer calls after every optimizer step) leaves the
    LR unchanged. It replaces the whole schedule, warm-up included: ``SequentialLR`` and
    ``ChainedScheduler`` call ``step()`` with no metric, so under them it would never decide, and both are
    refused with a ``TypeError`` (``SequentialLR`` when it is built, ``ChainedScheduler`` at its first step),
    as torch refuses ``ReduceLROnPlateau`` there. For a warm-up, step a warm-up scheduler yourself, then
    build this one with the epochs left. Trainers that call ``step(val_loss)`` themselves
    (Lightning, Hugging Face) cannot pass ``train_loss``: :meth:`observe_train_loss` records it beforehand instead, and the next decision
    uses the weighted mean of what was recorded since the previous one (the callbacks in
    :mod:`controller.integrations` do this with no user code).

    A NaN or infinite ``metrics`` / ``train_loss`` does not reach the policy: the LR is multiplied by
    the policy's ``cut_factor`` (0.25 for the bundled policy), a warning is issued once, and training
    carries on. The LR is never set to NaN or 0. Losses must be positive (the features are log ratios
    of losses): a negative one is warned about once, and so are a decision past ``total_epochs``, one with no
    optimizer step since the previous decision, a metric-less ``step()`` call before any decision
    with no trainer callback attached (a trainer without its callback, or a loop that calls ``step()`` as
    for other schedulers), and two live PolicySchedulers that take turns deciding for one optimizer.

    Args:
        optimizer: any ``torch.optim.Optimizer``, any number of param groups, on CPU or CUDA. Groups
            added later (progressive unfreezing) follow the same factor and are watched by the hook.
        total_epochs: the run's epoch budget (decisions expected: one per epoch). None defers it to a
            trainer integration, which calls :meth:`set_total_epochs` from the trainer's plan before
            the first decision (Hugging Face: the number of evaluations; Lightning: ``max_epochs``).
        policy: a policy file path, an already loaded :class:`PolicyNet`, or None for the bundled
            default policy.
        min_lr: lower bound(s) on each group's LR (a float or one per group), finite; each group's LR
            must start within its bounds. A float also bounds groups added later with
            ``optimizer.add_param_group``; per-group lists leave those unbounded. The factor is the
            first group's move after its bounds, so when that group is held at a bound all groups hold;
            another group held at its own bound returns to its ratio when the run's LR comes back.
        max_lr: upper bound(s) on each group's LR, likewise (``inf``: none). From an LR you have already tuned,
            ``max_lr=<that LR>`` lets the policy only lower it (the model card measures what that changes).
        sync_ranks: under ``torch.distributed`` (DDP and the trainers that use it), average the losses
            over the ranks of the default process group and apply rank 0's decision on every rank, so
            that replicas keep one LR even when each passes its own local loss (``history`` records
            the averages). Every rank must then call :meth:`step` with a metric at the same point.
            False: each rank decides alone.
        last_epoch: as in other torch schedulers; leave at -1 and use :meth:`load_state_dict` to resume.

    Attributes:
        history: one dict per decision: ``epoch``, ``epoch_lr`` (the LR the epoch ran with), ``lr``
            (set for the next epoch), ``action`` (raw policy output, None when a non-finite loss
            bypassed the policy), ``cut`` (safety cut fired), ``train_loss``, ``val_loss``,
            ``val_accuracy`` and ``obs`` (the observation). LRs are the first param group's.
            :func:`controller.plot_history` draws it.

    Example:
        >>> scheduler = PolicyScheduler(optimizer, total_epochs=30)
        >>> for epoch in range(30):
        ...     train_loss = train_one_epoch(model, optimizer)   # optimizer.step() inside
        ...     val_loss = evaluate(model)
        ...     scheduler.step(val_loss, train_loss=train_loss)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_epochs: int | None,
        policy: str | Path | PolicyNet | None = None,
        *,
        min_lr: float | Sequence[float] = 0.0,
        max_lr: float | Sequence[float] = math.inf,
        sync_ranks: bool = True,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if total_epochs is not None:
            total_epochs = _check_total_epochs(total_epochs)
        n_groups = len(optimizer.param_groups)
        self.min_lrs, min_listed = _per_group(min_lr, n_groups, "min_lr")
        self.max_lrs, max_listed = _per_group(max_lr, n_groups, "max_lr")
        # bounds for param groups added later (optimizer.add_param_group, e.g. Lightning's BaseFinetuning):
        # a single min_lr / max_lr applies to them too; per-group lists did not name them, so none
        self._later_bounds = (0.0 if min_listed else self.min_lrs[0], math.inf if max_listed else self.max_lrs[0])
        if not all(math.isfinite(lo) and lo >= 0 for lo in self.min_lrs):
            raise ValueError(f"min_lr must be finite and >= 0, got {self.min_lrs}")
        if not all(hi > 0 for hi in self.max_lrs):  # the LR is never set to 0 (NaN fails this too)
            raise ValueError(f"max_lr must be > 0 (inf: no bound), got {self.max_lrs}")
        if any(lo > hi for lo, hi in zip(self.min_lrs, self.max_lrs)):
            raise ValueError(f"min_lr {self.min_lrs} exceeds max_lr {self.max_lrs}")
        if any("lr" not in group for group in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} has a param group with no 'lr': PolicyScheduler sets LRs")
        lr0 = float(optimizer.param_groups[0]["lr"])
        if not (math.isfinite(lr0) and lr0 > 0):
            raise ValueError(f"the optimizer's LR must be positive and finite, got {lr0}")
        for i, (group, lo, hi) in enumerate(zip(optimizer.param_groups, self.min_lrs, self.max_lrs)):
            if not lo <= float(group["lr"]) <= hi:  # the first decision would jump the LR to the bound
                raise ValueError(
                    f"param group {i} starts at LR {float(group['lr'])}, outside its bounds [min_lr {lo}, max_lr {hi}]; "
                    "give bounds around each group's LR (a list gives one per group)"
                )
        self.policy = policy if isinstance(policy, PolicyNet) else load_policy(policy)
        if self.policy.n_features != len(FEATURE_NAMES):
            raise ValueError(f"policy takes {self.policy.n_features} features, this library computes {len(FEATURE_NAMES)}")
        self.action_config = self.policy.action_config
        self.total_epochs = total_epochs
        self.total_epochs_deferred = total_epochs is None
        """True when built with ``total_epochs=None``: a trainer integration fills the total in."""
        self.initial_lr = lr0
        # While the total is deferred the builder holds a stand-in of 1; step() refuses to decide until
        # set_total_epochs() replaces it, so the stand-in never reaches an observation.
        self.features = FeatureBuilder(total_epochs or 1, lr0, optimizer)
        self.history: list[dict[str, Any]] = []
        self._pending_train_sum = 0.0
        self._pending_train_weight = 0.0
        self._warned_nonfinite = False
        self._warned_negative = False
        self._warned_over_budget = False
        self._warned_no_steps = False
        self._warned_no_metric = False
        self._decided = False
        """True once this object has decided (in this process; a loaded state does not count)."""
        self._warned_rival = False
        self._needs_callback: str | None = None
        """The callback a trainer integration needs to feed the training loss (set by its config helper; cleared
        once its absence has been warned about)."""
        self._attached = False
        """True once a trainer callback (HF or Lightning) drives the decisions."""
        self._raw_lrs: list[float] = []
        """Each group's LR before its min_lr / max_lr bound: what the next factor multiplies (filled at the first
        decision)."""
        self.sync_ranks = sync_ranks
        self._hook = StepStatsHook(optimizer)
        super().__init__(optimizer, last_epoch)

    def set_total_epochs(self, total_epochs: int) -> None:
        """Set the epoch budget (the number of decisions the run will make) after construction.

        For a scheduler built with ``total_epochs=None``: trainer integrations call this once they
        know the trainer's plan. It may be called again (a resumed run with a longer plan); the
        progress feature of later decisions uses the new total.

        Args:
            total_epochs: a positive int.

        Example:
            >>> scheduler = PolicyScheduler(optimizer, total_epochs=None)
            >>> scheduler.set_total_epochs(12)
        """
        total_epochs = _check_total_epochs(total_epochs)
        self.total_epochs = total_epochs
        self.features.total_epochs = total_epochs

    def observe_train_loss(self, train_loss: float | torch.Tensor, weight: float = 1.0) -> None:
        """Record a training loss for the next decision, when the trainer's ``step`` call cannot pass one.

        The next :meth:`step` that makes a decision without an explicit ``train_loss`` uses the
        ``weight``-weighted mean of the losses recorded since the previous decision (then forgets them).
        The record is part of :meth:`state_dict`, so a checkpoint taken between recording and
        deciding resumes exactly.

        Args:
            train_loss: a mean training loss (over an epoch, or over a logging window).
            weight: how many samples or steps that mean covers (> 0).

        Example:
            >>> scheduler.observe_train_loss(0.82, weight=120)   # mean loss over 120 steps
            >>> scheduler.observe_train_loss(0.74, weight=80)
            >>> scheduler.step(val_loss)                          # decides with train loss 0.788
        """
        loss = _as_float(train_loss, "train_loss")
        w = _as_float(weight, "weight")
        if loss is None or w is None or not (math.isfinite(w) and w > 0):
            raise ValueError(f"need a train_loss and a positive finite weight, got {train_loss!r}, {weight!r}")
        self._pending_train_sum += loss * w  # a NaN/inf loss stays non-finite: the decision then cuts
        self._pending_train_weight += w

    @property
    def pending_train_loss(self) -> float | None:
        """The mean of the losses :meth:`observe_train_loss` recorded since the last decision, or None."""
        if self._pending_train_weight <= 0:
            return None
        return self._pending_train_sum / self._pending_train_weight

    def get_lr(self) -> list[float | torch.Tensor]:
        """The current LRs: only a decision in :meth:`step` changes them."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def step(  # type: ignore[override]
        self,
        metrics: float | torch.Tensor | None = None,
        *,
        train_loss: float | torch.Tensor | None = None,
        val_accuracy: float | torch.Tensor | None = None,
    ) -> None:
        """Decide the LR for the next epoch from this epoch's results.

        Args:
            metrics: the validation loss after the epoch. None: no decision, LR unchanged.
            train_loss: mean training loss over the epoch (recommended; the policy uses it). None: the
                mean recorded by :meth:`observe_train_loss` since the last decision, if any.
            val_accuracy: validation accuracy in [0, 1] for classification tasks.

        Raises:
            RuntimeError: a decision is due but the scheduler was built with ``total_epochs=None``
                and nothing has called :meth:`set_total_epochs`.
            ValueError: an argument that is not a number (or a one-element tensor), or a
                ``val_accuracy`` outside [0, 1]; nothing changes then.
            TypeError: stepped by ``ChainedScheduler``, which never passes a metric.
        """
        val_loss = _as_float(metrics, "metrics")
        if val_loss is None:
            if self.last_epoch < 0 or getattr(self, "_is_initial", False):  # the base class's initial call
                self.last_epoch = max(self.last_epoch, 0)
            elif not self._attached and (composite := _COMPOSITE_STEPS.get(sys._getframe(1).f_code)):
                raise _composite_error(composite)
            elif not (self._attached or self._warned_no_metric or self.history):
                # No callback and no decision yet: a trainer without its callback (HF calls step() after every
                # optimizer step), or a loop that calls step() as for other schedulers. Either way, no decision.
                budget = " with total_epochs=N" if self.total_epochs is None else ""
                sets = ", which sets the budget and passes" if self.total_epochs is None else ", which passes"
                warnings.warn(
                    "PolicyScheduler.step() was called with no metric, which leaves the LR unchanged: it decides only "
                    "from a validation loss. Under a trainer, add its callback"
                    f"{sets} the validation loss (controller.integrations.hf.PolicySchedulerCallback or "
                    "controller.integrations.lightning.PolicySchedulerCallback); in your own loop, call "
                    f"step(val_loss, train_loss=...) once per epoch{budget} (warned once)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned_no_metric = True
            self._last_lr = self.get_lr()
            return
        if self.total_epochs is None:
            raise RuntimeError(
                "PolicyScheduler was built with total_epochs=None and no epoch budget was set before its first "
                "decision: pass total_epochs=N, call scheduler.set_total_epochs(N), or add the trainer callback "
                "that fills it in (controller.integrations.hf.PolicySchedulerCallback or "
                "controller.integrations.lightning.PolicySchedulerCallback)"
            )
        train = _as_float(train_loss, "train_loss")
        accuracy = _as_float(val_accuracy, "val_accuracy")  # every argument checked before anything changes
        if accuracy is not None and not 0.0 <= accuracy <= 1.0 and not math.isnan(accuracy):
            raise ValueError(f"val_accuracy must be a fraction in [0, 1], got {accuracy} (a percentage? divide by 100)")
        if train is None:
            train = self.pending_train_loss
        if train is None and self._needs_callback is not None and not self._attached:
            warnings.warn(
                "PolicyScheduler is configured for a trainer (lr_scheduler_config) whose callback never attached, so "
                "it decides with no training loss (and a resumed run loses a decision): add "
                f"{self._needs_callback} (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._needs_callback = None
        self._pending_train_sum, self._pending_train_weight = 0.0, 0.0
        synced = self.sync_ranks and _ranks() > 1
        if synced:  # every rank decides from the same losses (its optimizer hook sees DDP's shared gradients)
            device = _collective_device(self._hook.device)
            val_loss, train, accuracy = _mean_over_ranks(val_loss, train, accuracy, device)
        self.last_epoch += 1
        self._step_count += 1
        if self.last_epoch > self.total_epochs and not self._warned_over_budget:
            warnings.warn(
                f"PolicyScheduler decision {self.last_epoch} exceeds total_epochs={self.total_epochs}: the policy "
                "learned on runs that end at their budget, so from here it sees a finished run and decides outside "
                "what it was trained on; pass the real budget (total_epochs=N, or set_total_epochs(N), also after "
                "load_state_dict, whose saved budget replaces the constructor's) (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_over_budget = True
        lr = float(self.optimizer.param_groups[0]["lr"])
        stats = self._hook.collect()
        if not stats.steps and not self._warned_no_steps:
            warnings.warn(
                f"PolicyScheduler decision {self.last_epoch} follows no optimizer step since the previous one, so the "
                "policy decides without its gradient signals: call step(val_loss) once per epoch, after the epoch's "
                "training, with the optimizer this scheduler was built on (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_no_steps = True
        last = _LAST_DECIDER.get(self.optimizer)
        rival = last() if last is not None else None
        if rival is not None and rival is not self and self._decided and not self._warned_rival:
            # both decided since this one's previous decision (a replacement never decides again: no warning)
            warnings.warn(
                "another PolicyScheduler decides for this optimizer too, so its LR moves twice an epoch, once by "
                "each: keep one (a replaced scheduler must stop stepping; `del` it, or drop your reference) "
                "(warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_rival = True
        if rival is not self:
            _LAST_DECIDER[self.optimizer] = weakref.ref(self)
        self._decided = True
        obs = self.features.observe(
            epoch=self.last_epoch, lr=lr, train_loss=train, val_loss=val_loss, val_accuracy=accuracy, stats=stats,
        )
        finite = math.isfinite(val_loss) and (train is None or math.isfinite(train))
        if (val_loss < 0 or (train is not None and train < 0)) and not self._warned_negative:
            warnings.warn(
                f"PolicyScheduler got a negative loss (val {val_loss}, train {train}) at epoch {self.last_epoch}: "
                "its features are log ratios of losses, so a negative loss reads as a huge improvement. Pass a "
                "positive quantity (the loss minus a known lower bound, for example) (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_negative = True
        action: float | None
        if finite:
            action = self.policy.act(obs)
            new_lr, cut = next_lr(
                lr, self.initial_lr, action, val_loss=val_loss, best_val_loss=self.features.best_before_last,
                config=self.action_config,
            )
        else:
            if not self._warned_nonfinite:
                warnings.warn(
                    f"PolicyScheduler got a non-finite loss (val {val_loss}, train {train}) at epoch "
                    f"{self.last_epoch}; cutting the LR by {self.action_config.cut_factor} instead of asking "
                    "the policy (warned once)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned_nonfinite = True
            action, cut = None, True
            new_lr = max(lr * self.action_config.cut_factor, self.initial_lr * self.action_config.min_ratio)
        # The reference group's own bounds first: the factor is what that group really moves by, so a group held at
        # its bound holds the others too (ratios kept; none drifts while the policy keeps asking for more).
        new_lr = min(max(new_lr, self.min_lrs[0]), self.max_lrs[0])
        factor = new_lr / lr
        if synced:  # and applies rank 0's decision, so replicas keep one LR even where their signals differ
            decided = torch.tensor([factor, math.nan if action is None else action, cut], dtype=torch.float64,
                                   device=device)
            torch.distributed.broadcast(decided, src=0)
            factor, raw, cut_flag = decided.tolist()
            action, cut = (None if math.isnan(raw) else raw), bool(cut_flag)
        for _ in range(len(self.optimizer.param_groups) - len(self.min_lrs)):  # groups added since
            self.min_lrs.append(self._later_bounds[0])
            self.max_lrs.append(self._later_bounds[1])
        raw = self._raw_lrs
        for i, (group, lo, hi) in enumerate(zip(self.optimizer.param_groups, self.min_lrs, self.max_lrs)):
            current = float(group["lr"])
            # Each group follows the factor from its unbounded LR, so that a group held at its own bound comes back
            # to its ratio when the run's LR does; a group added since, or set from outside, starts from its LR.
            if i == len(raw):
                raw.append(current)
            elif not math.isclose(current, min(max(raw[i], lo), hi), rel_tol=1e-6):
                raw[i] = current
            raw[i] *= factor
            value = min(max(raw[i], lo), hi)
            if isinstance(group["lr"], torch.Tensor):  # a tensor LR (capturable / compiled optimizers) stays one
                group["lr"].fill_(value)
            else:
                group["lr"] = value
        self._last_lr = self.get_lr()
        self.history.append(
            {
                "epoch": self.last_epoch,
                "epoch_lr": lr,
                "lr": self._last_lr[0],
                "action": action,
                "cut": cut,
                "train_loss": train,
                "val_loss": val_loss,
                "val_accuracy": accuracy,
                "obs": obs.tolist(),
            }
        )

    @property
    def _schedulers(self) -> list[LRScheduler]:
        """Refuses ``SequentialLR``, which asks every scheduler it is given for this (``recursive_undo``): so its
        construction fails at once rather than after epochs of constant LR. For anyone else it does not exist."""
        if sys._getframe(1).f_code is _RECURSIVE_UNDO:
            raise _composite_error("SequentialLR")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute '_schedulers'")

    def _update_lr(self, epoch: int | None = None) -> None:
        """What ``SequentialLR`` calls at a milestone (``PolicyScheduler.step`` never does): refused, as above."""
        raise _composite_error("SequentialLR")

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (loads with ``torch.load(..., weights_only=True)``); the policy is not included."""
        return {
            "version": _STATE_VERSION,
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "total_epochs": self.total_epochs,
            "initial_lr": self.initial_lr,
            "base_lrs": [float(lr) for lr in self.base_lrs],
            "_last_lr": [float(lr) for lr in self._last_lr],
            "min_lrs": list(self.min_lrs),
            "max_lrs": list(self.max_lrs),
            "features": self.features.state_dict(),
            "hook": self._hook.state_dict(),
            "history": [dict(h) for h in self.history],
            "_warned_nonfinite": self._warned_nonfinite,
            "_pending_train_sum": self._pending_train_sum,
            "_pending_train_weight": self._pending_train_weight,
            "_raw_lrs": list(self._raw_lrs),
            "_later_bounds": list(self._later_bounds),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next decision is the one the saved run would have made.

        As for torch's schedulers, the saved settings replace the constructor's (``total_epochs``, the initial
        LR, ``min_lr`` / ``max_lr``); to train on past the saved budget, call :meth:`set_total_epochs` after this.

        Raises:
            ValueError: another version, unknown or missing keys, or malformed parts; the scheduler is then
                left as it was.
        """
        before = self.state_dict()
        try:
            self._load_state(state_dict)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as err:
            self._load_state(before)  # a refused state leaves the scheduler as it was
            if isinstance(err, ValueError):
                raise
            raise ValueError(f"malformed PolicyScheduler state ({type(err).__name__}: {err})") from None

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        version = state.pop("version", None)
        if version != _STATE_VERSION:
            raise ValueError(f"PolicyScheduler state version {version!r} is not {_STATE_VERSION}")
        # every key is checked before anything changes: a refused state leaves the scheduler as it was
        parts, plain = {"features", "hook", "history"}, {
            "last_epoch", "_step_count", "total_epochs", "initial_lr", "base_lrs", "_last_lr",
            "min_lrs", "max_lrs", "_warned_nonfinite", "_pending_train_sum", "_pending_train_weight", "_raw_lrs",
            "_later_bounds",
        }
        if unknown := sorted(set(state) - parts - plain):
            raise ValueError(f"unknown PolicyScheduler state keys {unknown}")
        # absent from states of earlier versions
        optional = {"_pending_train_sum", "_pending_train_weight", "_raw_lrs", "_later_bounds"}
        if missing := sorted((parts | plain) - optional - set(state)):
            raise ValueError(f"PolicyScheduler state is missing {missing}")
        if not isinstance(state["history"], list) or not all(isinstance(h, dict) for h in state["history"]):
            raise ValueError("PolicyScheduler state 'history' must be a list of dicts")
        _check_plain_state(state)
        # _last_lr holds one LR per group the saved optimizer had at its last step (the per-group bounds grow with it;
        # groups added since the save are fine: they join as groups added later do); more than this optimizer has
        # means another model or optimizer
        saved_groups = len(state["_last_lr"])
        if saved_groups > len(self.optimizer.param_groups):
            raise ValueError(
                f"this PolicyScheduler state was saved with {saved_groups} param groups and this scheduler's optimizer "
                f"has {len(self.optimizer.param_groups)}: their bounds and LRs would land on the wrong groups; resume "
                "onto the optimizer the state was saved with (its param groups, in the same order)"
            )
        features = state["features"]
        saved_kind = features.get("optimizer_kind") if isinstance(features, dict) else None
        if saved_kind is not None and saved_kind != self.features.optimizer_kind:
            raise ValueError(
                f"this PolicyScheduler state was saved with a {saved_kind!r} optimizer and this scheduler's is "
                f"{self.features.optimizer_kind!r} ({type(self.optimizer).__name__}): the policy's optimizer feature "
                "would be wrong; resume onto the same kind of optimizer, or start a new scheduler"
            )
        self.features.load_state_dict(state.pop("features"))
        self._hook.load_state_dict(state.pop("hook"))
        self.history = [dict(h) for h in state.pop("history")]
        # absent from states saved by earlier versions: nothing pending; unbounded LRs start from the groups' LRs;
        # groups added later take the constructor's bounds
        self._pending_train_sum, self._pending_train_weight, self._raw_lrs = 0.0, 0.0, []
        for key, value in state.items():  # lists copied: decisions change them in place, not the caller's dict
            setattr(self, key, list(value) if isinstance(value, list) else value)
