"""``PolicyScheduler`` inside PyTorch Lightning: the scheduler config, and a callback for the training loss.

Lightning steps an epoch-interval scheduler once per epoch, after validation, and passes it the
monitored metric only when its config says ``"reduce_on_plateau": True`` with a ``"monitor"`` key:
:func:`lr_scheduler_config` returns that config. Lightning never passes the training loss, so
:class:`PolicySchedulerCallback` averages what ``training_step`` returns over the epoch and records the
mean on the scheduler (:meth:`PolicyScheduler.observe_train_loss`) before Lightning's step.

One epoch of ``Trainer.fit`` in Lightning 2.6, read in the installed source
(``loops/training_epoch_loop.py``, ``loops/fit_loop.py``) and checked by running it:

1. ``on_train_batch_end`` after every batch — the callback adds the batch loss (on the device);
2. validation after the last batch, ending in ``on_validation_end`` — the callback remembers the
   monitored value; ``ModelCheckpoint(save_on_train_epoch_end=False)`` saves here;
3. ``on_train_epoch_end``: plain callbacks, then the LightningModule, then checkpoint callbacks
   (``ModelCheckpoint`` saves here by default) — the callback records the epoch's mean loss;
4. the plateau-scheduler update: ``lr_scheduler_step(scheduler, val_loss)`` → ``scheduler.step(val_loss)``.

Resuming: both checkpoint positions come before step 4, and Lightning, resuming from either, skips
step 4 for that epoch (``fit_loop.on_advance_end``: metric-based schedulers are not updated while
restarting). That decision would be lost and the resumed LR sequence would drift from an
uninterrupted run's. The callback keeps the epoch's validation loss in its own checkpointed state and
makes that one decision at the start of the first resumed epoch, from the same inputs.

A checkpoint saved at an epoch's last batch, in step 1 (``ModelCheckpoint(every_n_train_steps=...)``),
comes before that epoch's validation, and Lightning, resuming from it, goes straight on to the next epoch: the epoch
is never validated and its decision cannot be made. The callback tags its loss sum with the epoch, so it
notices, warns, and keeps that epoch's loss and optimizer steps out of the next decision.

Requires ``pip install 'lrcontrol[lightning]'`` (the ``pytorch_lightning`` package), or the ``lightning`` package
(``import lightning as L``): either one's Trainer takes the callback.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

# Lightning ships as two packages holding the same code under two names: ``pytorch_lightning`` (the extra installs it)
# and ``lightning.pytorch`` (``import lightning as L``). The callback subclasses the Callback of each one installed,
# and reads a Trainer of either (nothing below compares classes of one package with objects of the other).
_callback_bases: list[type] = []
try:
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.data import extract_batch_size

    _callback_bases.append(pl.Callback)
except ImportError:
    pass
try:
    import lightning.pytorch as _lightning_pytorch

    _callback_bases.append(_lightning_pytorch.Callback)
    if len(_callback_bases) == 1:
        pl = _lightning_pytorch  # type: ignore[misc,no-redef]
        from lightning.pytorch.utilities.data import extract_batch_size  # type: ignore[no-redef]
except ImportError:
    pass
if not _callback_bases:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "controller.integrations.lightning needs PyTorch Lightning (the pytorch_lightning package, or the lightning "
        "package): pip install 'lrcontrol[lightning]'"
    )

from controller.scheduler import PolicyScheduler

__all__ = ["PolicySchedulerCallback", "lr_scheduler_config"]


def lr_scheduler_config(scheduler: PolicyScheduler, monitor: str = "val_loss") -> dict[str, Any]:
    """The ``"lr_scheduler"`` entry of ``configure_optimizers`` that makes Lightning pass the metric.

    Args:
        scheduler: the run's :class:`PolicyScheduler`.
        monitor: the name of the validation loss as logged by ``self.log`` in validation.

    Returns:
        ``{"scheduler", "interval": "epoch", "frequency": 1, "reduce_on_plateau": True, "monitor", "strict": True}``.

    Example:
        >>> def configure_optimizers(self):
        ...     optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        ...     scheduler = PolicyScheduler(optimizer, total_epochs=None)   # None: the Trainer's plan
        ...     return {"optimizer": optimizer, "lr_scheduler": lr_scheduler_config(scheduler)}
    """
    if not isinstance(scheduler, PolicyScheduler):
        raise TypeError(f"expected a PolicyScheduler, got {type(scheduler).__name__}")
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"monitor must be the logged name of the validation loss, got {monitor!r}")
    # Lightning steps this scheduler with the validation loss alone: the callback must feed the training loss
    scheduler._needs_callback = "pytorch_lightning: callbacks=[controller.integrations.lightning.PolicySchedulerCallback()]"
    return {
        "scheduler": scheduler,
        "interval": "epoch",
        "frequency": 1,
        "reduce_on_plateau": True,  # without it Lightning calls step() with no metric: no decision
        "monitor": monitor,
        "strict": True,
    }


def _batch_size(batch: Any) -> int:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # an exotic batch: fall back to one unit per batch
        return 1


def _overrides(module: Any, name: str) -> bool:
    """Whether ``module``'s class overrides ``LightningModule.name`` (of either package), as Lightning's own
    ``is_overridden`` says for a module of its package."""
    for cls in type(module).__mro__:
        if cls.__name__ == "LightningModule" and cls.__module__.endswith(".core.module"):
            return getattr(type(module), name, None) is not getattr(cls, name, None)
    return callable(getattr(module, name, None))


class PolicySchedulerCallback(*_callback_bases):  # type: ignore[misc]
    """Feeds a :class:`PolicyScheduler` what Lightning does not: the epoch's training loss.

    It also checks the scheduler config at the start of training, fills in ``total_epochs`` from
    ``Trainer(max_epochs=...)`` (fewer when ``max_steps`` ends the run sooner) when the scheduler was built
    with ``total_epochs=None`` and warns when an explicit total differs from that plan, and restores
    the decision Lightning skips when resuming from an end-of-epoch checkpoint (see the module docs). From a
    checkpoint saved after an epoch's last batch but before its validation, that epoch's decision cannot be
    made (Lightning never validates it): the callback warns and keeps that epoch's loss out of the next one's.

    The training loss of a batch is the ``loss`` that ``training_step`` returns (a tensor, or the
    ``"loss"`` entry of a dict), weighted by the batch size; it stays on the device until the epoch
    ends (one host read per epoch). Automatic optimization only: with manual optimization Lightning
    steps no scheduler, so call ``scheduler.step(val_loss, train_loss=...)`` yourself.

    Attributes:
        scheduler: the run's scheduler, found at ``on_train_start`` (``scheduler.history`` lists the decisions).

    Example:
        >>> from controller import PolicyScheduler
        >>> from controller.integrations.lightning import PolicySchedulerCallback, lr_scheduler_config
        >>> class Model(pl.LightningModule):
        ...     def training_step(self, batch, batch_idx):
        ...         return loss                                  # reaches the scheduler via the callback
        ...     def validation_step(self, batch, batch_idx):
        ...         self.log("val_loss", loss)                   # reaches scheduler.step(val_loss)
        ...     def configure_optimizers(self):
        ...         optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        ...         scheduler = PolicyScheduler(optimizer, total_epochs=None)   # None: max_epochs
        ...         return {"optimizer": optimizer, "lr_scheduler": lr_scheduler_config(scheduler)}
        >>> trainer = pl.Trainer(max_epochs=20, callbacks=[PolicySchedulerCallback()])
        >>> trainer.fit(Model(), train_loader, val_loader)
    """

    def __init__(self) -> None:
        self.scheduler: PolicyScheduler | None = None
        self._monitor = "val_loss"
        self._loss_sum: torch.Tensor | None = None
        self._loss_weight = 0.0
        self._loss_epoch: int | None = None
        """The epoch whose batches ``_loss_sum`` adds up."""
        self._pending: dict[str, Any] | None = None
        """The latest validation loss: ``{"epoch", "val_loss", "decisions"}`` (decisions made before it)."""
        self._first_epoch = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new fit starts from nothing; a resumed one then gets this callback's state from its checkpoint.

        Lightning calls ``setup`` before it restores callbacks. Without this, a callback reused after an
        interrupted fit carried that fit's partial epoch into the next one and took it for a checkpoint
        saved before validation (a false warning, and every decision of the new run one epoch late).
        """
        if stage == "fit":
            self.scheduler = None
            self._loss_sum, self._loss_weight, self._loss_epoch = None, 0.0, None
            self._pending = None
            self._first_epoch = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scheduler, self._monitor = _find_scheduler(trainer)
        planned = _planned_epochs(trainer)
        if self.scheduler.total_epochs_deferred:
            if planned is None and trainer.max_steps is not None and trainer.max_steps >= 0:
                raise ValueError(
                    f"PolicyScheduler(total_epochs=None) takes its budget from Trainer(max_steps={trainer.max_steps}) "
                    "here, but the train dataloader has no length (an IterableDataset, for example), so the steps "
                    "cannot be turned into epochs: build the scheduler with total_epochs=N, the epochs the run will "
                    "validate, or set Trainer(max_epochs=...)"
                )
            if planned is None:
                raise ValueError(
                    "PolicyScheduler(total_epochs=None) takes its budget from Trainer(max_epochs=...) or max_steps, "
                    f"which are {trainer.max_epochs} and {trainer.max_steps}; set one or build the scheduler with "
                    "total_epochs=N"
                )
            self.scheduler.set_total_epochs(planned)
        elif planned is not None and self.scheduler.total_epochs != planned:
            warnings.warn(
                f"PolicyScheduler(total_epochs={self.scheduler.total_epochs}) but the Trainer plans {planned} epochs "
                "(one decision each): the policy's progress feature will be off; pass total_epochs=None to use the "
                "plan",
                RuntimeWarning,
                stacklevel=2,
            )
        self.scheduler._attached = True
        self._first_epoch = True
        if self._loss_sum is not None and self._loss_epoch is not None and self._loss_epoch != trainer.current_epoch:
            self._drop_unvalidated_epoch(self._loss_epoch)

    def _drop_unvalidated_epoch(self, epoch: int) -> None:
        """Resumed from a checkpoint saved after ``epoch``'s last training batch but before its validation.

        Lightning goes straight on to the next epoch then: ``epoch`` is never validated, so no decision is
        made for it. Its training loss and optimizer-hook window are dropped rather than mixed into the next
        epoch's, and the decision count moves on by one, so that later decisions see the progress of the
        uninterrupted run.
        """
        assert self.scheduler is not None
        warnings.warn(
            f"resumed from a checkpoint saved after epoch {epoch}'s last training batch and before its validation "
            "(ModelCheckpoint(every_n_train_steps=...), for example): Lightning does not validate that epoch on "
            f"restart, so PolicyScheduler makes no decision for it and the LR sequence from here differs from an "
            "uninterrupted run's. Checkpoints saved at the end of an epoch (ModelCheckpoint's default) resume exactly",
            RuntimeWarning,
            stacklevel=2,
        )
        self._loss_sum, self._loss_weight, self._loss_epoch = None, 0.0, None
        self.scheduler._hook.collect()  # that epoch's optimizer steps, read by no decision
        self.scheduler.last_epoch += 1  # the epoch was trained: progress counts it

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        resumed, self._first_epoch = self._first_epoch, False
        if (
            resumed
            and pending is not None
            and self.scheduler is not None
            and pending["epoch"] == trainer.current_epoch - 1
            and self.scheduler.last_epoch == pending["decisions"]
        ):
            # Resumed from a checkpoint taken after the previous epoch's validation but before its
            # scheduler step, which Lightning skips on restart: make the decision the uninterrupted
            # run made there. Train loss and optimizer-hook window come back with the scheduler state.
            self.scheduler.step(pending["val_loss"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return  # a skipped step (training_step returned None)
        # Lightning hands out the loss divided by accumulate_grad_batches: undo that.
        n = _batch_size(batch)
        weighted = loss.detach().float().reshape(()) * (trainer.accumulate_grad_batches * n)
        if self._loss_sum is None:
            self._loss_sum, self._loss_epoch = weighted, trainer.current_epoch
        else:
            self._loss_sum = self._loss_sum + weighted
        self._loss_weight += n

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.scheduler is None:
            return
        value = trainer.callback_metrics.get(self._monitor)
        if value is None:
            return  # Lightning itself raises: the monitored metric is missing
        self._pending = {
            "epoch": trainer.current_epoch, "val_loss": float(value), "decisions": self.scheduler.last_epoch,
        }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scheduler is not None and self._loss_sum is not None and self._loss_weight > 0:
            # One record per epoch, so its weight is irrelevant: 1 keeps the mean bit-exact.
            self.scheduler.observe_train_loss(float(self._loss_sum) / self._loss_weight, weight=1.0)
        self._loss_sum, self._loss_weight, self._loss_epoch = None, 0.0, None

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the epoch's loss so far (and which epoch) and the latest validation loss."""
        return {
            "loss_sum": None if self._loss_sum is None else float(self._loss_sum),
            "loss_weight": self._loss_weight,
            "loss_epoch": self._loss_epoch,
            "pending": None if self._pending is None else dict(self._pending),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loss_sum = state_dict["loss_sum"]
        self._loss_sum = None if loss_sum is None else torch.tensor(float(loss_sum))
        self._loss_weight = float(state_dict["loss_weight"])
        self._loss_epoch = state_dict.get("loss_epoch")  # absent from checkpoints of earlier versions
        self._pending = None if state_dict["pending"] is None else dict(state_dict["pending"])


def _planned_epochs(trainer: pl.Trainer) -> int | None:
    """The epochs the run will validate (one decision each): ``max_epochs``, or fewer when ``max_steps`` ends it
    sooner; None when neither bounds it (or ``max_steps`` does, but the train loader has no length).

    An epoch that ``max_steps`` cuts short is not validated (Lightning stops without it), so it is not counted.
    """
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 1 else None
    batches = trainer.num_training_batches
    if trainer.max_steps is not None and trainer.max_steps >= 0 and 0 < batches < math.inf:
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        by_steps = max(1, trainer.max_steps // steps_per_epoch)  # whole epochs: a cut-short one is not validated
        epochs = by_steps if epochs is None else min(epochs, by_steps)
    return epochs


def _find_scheduler(trainer: pl.Trainer) -> tuple[PolicyScheduler, str]:
    """The run's PolicyScheduler and monitored metric; a clear error for configs that would never decide."""
    fix = 'return {"optimizer": optimizer, "lr_scheduler": lr_scheduler_config(scheduler)} from configure_optimizers'
    if not trainer.lightning_module.automatic_optimization:
        raise ValueError(
            "Lightning steps no scheduler under manual optimization: call scheduler.step(val_loss, "
            "train_loss=...) yourself and drop PolicySchedulerCallback"
        )
    configs = [c for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, PolicyScheduler)]
    if len(configs) != 1:
        raise ValueError(f"PolicySchedulerCallback needs exactly one PolicyScheduler, found {len(configs)}: {fix}")
    config = configs[0]
    if not (config.interval == "epoch" and config.frequency == 1 and config.reduce_on_plateau and config.monitor):
        raise ValueError(
            "with this scheduler config Lightning would not pass the validation loss to PolicyScheduler once per "
            f"epoch (interval={config.interval!r}, frequency={config.frequency}, "
            f"reduce_on_plateau={config.reduce_on_plateau}, monitor={config.monitor!r}): {fix}"
        )
    scheduler, monitor = config.scheduler, config.monitor
    assert isinstance(scheduler, PolicyScheduler) and monitor is not None  # checked above; for mypy
    if trainer.limit_val_batches == 0 or not _overrides(trainer.lightning_module, "validation_step"):
        raise ValueError(
            "PolicyScheduler decides once per epoch from that epoch's validation loss, and this run never validates "
            "(limit_val_batches=0, or no validation_step): define validation_step, pass val_dataloaders and "
            "log the monitored loss"
        )
    if trainer.check_val_every_n_epoch != 1:
        raise ValueError(
            "PolicyScheduler decides once per epoch from that epoch's validation loss: validate every epoch "
            f"(Trainer(check_val_every_n_epoch=1)), got check_val_every_n_epoch={trainer.check_val_every_n_epoch}"
        )
    return scheduler, monitor
