"""``PolicyScheduler`` inside the Hugging Face ``Trainer``: a callback that makes one decision per evaluation.

``Trainer(optimizers=(optimizer, scheduler))`` calls ``scheduler.step()`` with no argument after every
optimizer step, which leaves a :class:`PolicyScheduler`'s LR unchanged. The decisions come from
:class:`PolicySchedulerCallback`:

- ``on_train_begin``: when the scheduler was built with ``total_epochs=None``, sets it to the number
  of evaluations the Trainer's plan holds (:func:`planned_decisions`);
- ``on_step_end`` / ``on_epoch_end``: when the Trainer is about to evaluate, has it log first;
- ``on_log``: records each logged training loss (``logs["loss"]``, the mean over the steps since the
  previous log) on the scheduler, weighted by those steps;
- ``on_evaluate``: ``scheduler.step(metrics["eval_loss"])`` — one decision per evaluation, using the
  mean training loss logged since the previous decision.

The policy reads the training loss at every decision, so the callback has the Trainer log at every
evaluation during training (``on_step_end`` / ``on_epoch_end``), whatever ``logging_strategy`` says:
expect a ``loss`` entry in ``log_history`` at each evaluation step. Without it an evaluation off the
logging grid (the Trainer's last one when ``max_steps`` is not a multiple of ``eval_steps``, or any
evaluation under ``logging_steps`` > ``eval_steps``) would decide without the training loss.

In ``_maybe_log_save_evaluate`` the Trainer logs, then evaluates, then saves, so a checkpoint taken at
an evaluation holds the state after that evaluation's decision, and a run resumed from it continues
the same LR sequence. For an exact resume, save at evaluation steps (``save_steps`` a multiple of
``eval_steps``, as ``load_best_model_at_end`` requires anyway).

Requires ``pip install 'lrcontrol[hf]'`` (transformers and accelerate).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import IntervalStrategy
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "controller.integrations.hf needs Hugging Face transformers and accelerate: pip install 'lrcontrol[hf]'"
    ) from err

from controller.scheduler import PolicyScheduler

__all__ = ["PolicySchedulerCallback", "planned_decisions"]


def planned_decisions(args: TrainingArguments, state: TrainerState) -> int | None:
    """How many evaluations (so decisions) the Trainer's plan holds, as ``DefaultFlowCallback`` schedules them.

    ``"steps"``: every ``eval_steps``-th optimizer step from ``eval_delay`` on, plus the last step
    when ``max_steps`` is not a multiple of ``eval_steps``. ``"epoch"``: every epoch that ends at or
    after ``eval_delay`` (the last one cut short by ``max_steps`` included: the Trainer evaluates it).

    Returns:
        The count, or None when the plan does not hold it: ``"epoch"`` over a train set with no length
        (streaming) under ``max_steps``, where the Trainer runs epochs until the steps are spent and
        sets ``num_train_epochs`` to ``sys.maxsize``.

    Args:
        args: the Trainer's arguments.
        state: the Trainer's state at ``on_train_begin`` (``max_steps``, ``eval_steps`` and
            ``num_train_epochs`` are set by then).

    Raises:
        ValueError: ``eval_strategy="no"``: without evaluations the scheduler never decides.
    """
    strategy = IntervalStrategy(args.eval_strategy)
    delay = args.eval_delay or 0
    if strategy == IntervalStrategy.STEPS:
        every, last = int(state.eval_steps), int(state.max_steps)
        steps = {s for s in range(every, last + 1, every) if s >= delay}
        if last >= delay:
            steps.add(last)  # DefaultFlowCallback evaluates at the end when the last step is off the grid
        return max(len(steps), 1)
    if strategy == IntervalStrategy.EPOCH:
        # the epochs 1..N at or past the delay, counted without a loop: an unsized train set under max_steps
        # makes N sys.maxsize, and counting one by one never ended
        epochs = int(state.num_train_epochs)
        if epochs == sys.maxsize:
            return None
        return max(epochs - max(math.ceil(delay), 1) + 1, 1)
    raise ValueError(
        "PolicyScheduler decides at each evaluation, but TrainingArguments(eval_strategy='no') never evaluates: "
        "set eval_strategy='epoch' or 'steps' (and give the Trainer an eval_dataset)"
    )


class PolicySchedulerCallback(TrainerCallback):
    """Feeds a :class:`PolicyScheduler` passed to ``Trainer(optimizers=...)``: one decision per evaluation.

    Only evaluations during ``trainer.train()`` decide; ``eval_on_start`` and ``trainer.evaluate()``
    calls outside training leave the LR alone.

    Args:
        metric: the evaluation metric the policy reads as the validation loss.
        accuracy_metric: an evaluation metric in [0, 1] to pass as ``val_accuracy`` (e.g.
            ``"eval_accuracy"`` from your ``compute_metrics``), or None.

    Attributes:
        scheduler: the run's scheduler, found at ``on_train_begin`` (``scheduler.history`` lists the decisions).

    Example:
        >>> from controller import PolicyScheduler
        >>> from controller.integrations.hf import PolicySchedulerCallback
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        >>> scheduler = PolicyScheduler(optimizer, total_epochs=None)   # None: one per planned evaluation
        >>> args = TrainingArguments("out", eval_strategy="epoch", logging_strategy="epoch", save_strategy="epoch",
        ...                          num_train_epochs=10)   # saved at evaluations: resumes exactly
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
        ...                   optimizers=(optimizer, scheduler), callbacks=[PolicySchedulerCallback()])
        >>> trainer.train()
    """

    def __init__(self, metric: str = "eval_loss", accuracy_metric: str | None = None) -> None:
        self.metric = metric
        self.accuracy_metric = accuracy_metric
        self.scheduler: PolicyScheduler | None = None
        self._training = False
        self._last_log_step = 0
        self._last_decision_step = 0
        self._warned_no_train_loss = False
        self._unmatched: tuple[int, set[str]] = (0, set())  # step and metric names of evaluations without `metric`

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scheduler = kwargs.get("lr_scheduler")
        if not isinstance(scheduler, PolicyScheduler):
            raise ValueError(
                "PolicySchedulerCallback needs the Trainer's scheduler to be a PolicyScheduler, got "
                f"{type(scheduler).__name__}: pass Trainer(optimizers=(optimizer, PolicyScheduler(optimizer, None)))"
            )
        planned = planned_decisions(args, state)
        if scheduler.total_epochs_deferred:
            if planned is None:
                raise ValueError(
                    "PolicyScheduler(total_epochs=None) takes one decision per planned evaluation, but with "
                    f"eval_strategy='epoch' over a train set with no length (streaming) and max_steps={args.max_steps} "
                    "the Trainer cannot say how many epochs it will run: build the scheduler with total_epochs=N, "
                    "the number of epochs, or evaluate on a step grid (eval_strategy='steps')"
                )
            scheduler.set_total_epochs(planned)
        elif planned is not None and scheduler.total_epochs != planned:
            warnings.warn(
                f"PolicyScheduler(total_epochs={scheduler.total_epochs}) but the Trainer plans {planned} evaluations "
                "(one decision each): the policy's progress feature will be off; "
                "pass total_epochs=None to use the plan",
                RuntimeWarning,
                stacklevel=2,
            )
        scheduler._attached = True  # its step() calls with no metric are the Trainer's, expected
        self.scheduler = scheduler
        self._training = True
        self._unmatched = (0, set())  # from an earlier train() that an exception ended, when the callback is reused
        # A resumed run starts counting from its checkpoint's step, as the Trainer's own loss logging does.
        self._last_log_step = self._last_decision_step = state.global_step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._training or self.scheduler is None or not logs or "loss" not in logs:
            return  # evaluation logs and the final summary carry no "loss"
        steps = state.global_step - self._last_log_step
        self._last_log_step = state.global_step
        if steps > 0:
            self.scheduler.observe_train_loss(logs["loss"], weight=steps)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._training or self.scheduler is None or state.global_step <= self._last_decision_step:
            return
        metrics = metrics or {}
        if self.metric not in metrics:
            # eval_dataset={"a": ..., "b": ...} evaluates each set in turn, one call each: another set may carry it.
            # None did if training goes on (or ends) without a decision at this step: _check_unmatched says so.
            self._unmatched = (state.global_step, self._unmatched[1] | set(metrics))
            return
        self._unmatched = (0, set())
        accuracy = None
        if self.accuracy_metric is not None:
            if self.accuracy_metric not in metrics:
                raise KeyError(
                    f"PolicySchedulerCallback(accuracy_metric={self.accuracy_metric!r}) is not among the evaluation "
                    f"metrics {sorted(metrics)}"
                )
            accuracy = metrics[self.accuracy_metric]
        if self.scheduler.pending_train_loss is None and not self._warned_no_train_loss:
            warnings.warn(
                f"no training loss was logged since the previous decision (step {state.global_step}): the policy "
                "decides without it. PolicySchedulerCallback asks the Trainer to log at every evaluation; a callback "
                "after it in the Trainer's list cancelled that log (control.should_log = False) (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_no_train_loss = True
        self.scheduler.step(metrics[self.metric], val_accuracy=accuracy)
        self._last_decision_step = state.global_step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._log_before_evaluating(control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._log_before_evaluating(control)

    def _log_before_evaluating(self, control: TrainerControl) -> None:
        """Have the Trainer log the training loss before an evaluation it is about to run, so the decision reads it.

        ``DefaultFlowCallback`` (first in the Trainer's list) has set ``should_evaluate`` by now; the Trainer
        logs, then evaluates, in ``_maybe_log_save_evaluate``, and logs only when steps passed since its last log.
        """
        if self._training and control.should_evaluate:
            control.should_log = True

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._check_unmatched()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._training = False
        self._check_unmatched()

    def _check_unmatched(self) -> None:
        """Raise once the evaluations of a step are over and none of them reported ``metric``."""
        step, names = self._unmatched
        if names and step > self._last_decision_step:
            self._unmatched = (0, set())
            raise KeyError(
                f"PolicySchedulerCallback(metric={self.metric!r}) is not among the evaluation metrics "
                f"{sorted(names)}; pass the name of your validation loss"
            )

