"""Run inner tasks under LR schedules — the learned policy through the public ``PolicyScheduler``,
and the schedules a practitioner would otherwise use — and score them against a grid-search oracle.

Protocol (``evaluate_policy``):

- tasks: ``seeds`` tasks per family, drawn with :meth:`TaskFamily.sample` (architecture, batch size,
  optimizer, epoch budget, seed), each started at ``multiplier`` × the family's default LR;
- schedules: ``policy`` (``controller.PolicyScheduler``, given the validation accuracy of classification tasks
  unless ``policy_accuracy=False``), ``constant``, ``cosine``
  (``CosineAnnealingLR`` to 0), ``step`` (×0.1 at 50 % and 75 % of the budget), ``onecycle``
  (``OneCycleLR`` with the initial LR as its peak, stepped per batch) and ``plateau``
  (``ReduceLROnPlateau``, patience 2, factor 0.5), each with the task's own optimizer;
- oracle: per task (family, seed), the best final test loss of cosine annealing over the LR grid
  ``default × 3^k``, k = -3..3 — what a full grid search gets;
- score: final test loss ÷ oracle's, capped at :data:`RATIO_CAP`; a diverged run scores the cap.
  Aggregates: per seed, the geometric mean over that seed's tasks (one per family), reported as mean ±
  std over seeds. A single family has one task per seed, so its figure is the (arithmetic) mean over
  seeds of that task's ratio.
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from controller.policy import PolicyNet
from controller.scheduler import PolicyScheduler
from envs import local_data
from envs.inner import TorchRun
from envs.tasks import TaskConfig, check_epoch_range, get_family

BASELINES: tuple[str, ...] = ("constant", "cosine", "step", "onecycle", "plateau")
"""Schedules the policy is compared with."""
ORACLE_GRID: tuple[float, ...] = tuple(3.0**k for k in range(-3, 4))
"""LR multipliers of the oracle's grid search (×1/27 … ×27 of the family default)."""
MULTIPLIERS: tuple[float, ...] = (0.1, 1.0, 10.0)
"""Initial-LR multipliers of the evaluation protocol."""
RATIO_CAP = 10.0
"""Ratios to the oracle are capped here; a diverged run counts as this."""


@dataclass
class RunRecord:
    """One inner run under one schedule."""

    family: str
    seed: int
    """Index of the task within its family's evaluation draw (not the task's RNG seed)."""
    multiplier: float
    schedule: str
    lrs: list[float] = field(default_factory=list)
    """LR of the first param group during each epoch."""
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    """Validation loss after each epoch."""
    initial_test: float = math.nan
    """Test loss of the untrained model."""
    final_test: float = math.nan
    final_val: float = math.nan
    diverged: bool = False
    """A loss became non-finite (the run stopped there)."""

    @property
    def blew_up(self) -> bool:
        """Finite blow-up: the final test loss is above the untrained model's."""
        return not self.diverged and self.final_test > self.initial_test


EVALUATION_SEED = 1000
"""Task i of a family in ``evaluate`` is drawn from seed (EVALUATION_SEED + i, crc32(family))."""
SELECTION_SEED = 2000
"""The periodic validation during training draws its tasks from another range, so that the tasks a
policy is selected on are not the tasks it is finally evaluated on."""


def evaluation_tasks(family: str, seeds: int, multiplier: float, base_seed: int = EVALUATION_SEED,
                     epochs: tuple[int, int] | None = None) -> list[TaskConfig]:
    """The evaluation tasks of a family: task i comes from ``default_rng([base_seed + i, crc32(family)])``.

    The family's name is part of the seed, so that task i of two families is drawn independently
    (optimizer, budget, architecture). The same draw at another multiplier gives the same task
    with another initial LR; with ``epochs`` (a budget range) the same task with a budget drawn from it.
    """
    fam = get_family(family)
    key = zlib.crc32(family.encode())
    return [fam.sample(np.random.default_rng([base_seed + i, key]), lr_multiplier=multiplier, epochs=epochs)
            for i in range(seeds)]


def make_baseline(name: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> Any:
    """The scheduler of baseline ``name`` (one of :data:`BASELINES`; None for ``constant``), as this protocol runs it.

    ``onecycle`` steps after every optimizer step, ``plateau`` after each epoch with the validation loss, ``cosine``
    and ``step`` after each epoch with no argument.
    """
    sched = torch.optim.lr_scheduler
    if name == "constant":
        return None
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "step":
        return sched.MultiStepLR(optimizer, milestones=[epochs // 2, (3 * epochs) // 4], gamma=0.1)
    if name == "onecycle":
        lr = optimizer.param_groups[0]["lr"]
        return sched.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    if name == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", patience=2, factor=0.5)
    raise ValueError(f"unknown schedule {name!r}; known: policy, {', '.join(BASELINES)}")


def run_schedule(
    task: TaskConfig,
    schedule: str,
    policy: PolicyNet | None = None,
    *,
    seed_index: int = 0,
    multiplier: float = math.nan,
    device: str = "cpu",
    policy_accuracy: bool = True,
    policy_options: Mapping[str, Any] | None = None,
) -> RunRecord:
    """Train ``task`` for its epoch budget under ``schedule`` and record its curves.

    Args:
        task: the inner task (its ``lr`` is the initial LR).
        schedule: ``"policy"`` (needs ``policy``) or one of :data:`BASELINES`.
        policy: the policy network for ``"policy"``, run through ``controller.PolicyScheduler``.
        seed_index, multiplier: stored in the record for reporting.
        device: where the inner run lives.
        policy_accuracy: pass the validation accuracy of classification tasks to the policy's ``step`` (False: as a
            loop that passes none).
        policy_options: more keyword arguments for the policy's ``PolicyScheduler`` (``min_lr``, ``max_lr``).
    """
    run = TorchRun(task, device, hook=False)
    optimizer = run.task.optimizer
    steps_per_epoch = math.ceil(run.task.data.x_train.shape[0] / task.batch_size)
    record = RunRecord(task.family, seed_index, multiplier, schedule)
    record.initial_test = run.evaluate("test")[0]
    after_step: Callable[[], None] | None = None
    if schedule == "policy":
        if policy is None:
            raise ValueError("schedule 'policy' needs a policy")
        scheduler: Any = PolicyScheduler(optimizer, total_epochs=task.epochs, policy=policy, **(policy_options or {}))
    else:
        scheduler = make_baseline(schedule, optimizer, task.epochs, steps_per_epoch)
        if schedule == "onecycle":
            after_step = scheduler.step
    for epoch in range(1, task.epochs + 1):
        record.lrs.append(run.lr)
        train_loss = run.train_epoch(after_step=after_step)
        val_loss, val_acc = run.evaluate("val")
        record.train_losses.append(train_loss)
        record.val_losses.append(val_loss)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            record.diverged = True
            break
        if epoch == task.epochs:
            break
        if schedule == "policy":
            scheduler.step(val_loss, train_loss=train_loss, val_accuracy=val_acc if policy_accuracy else None)
        elif schedule == "plateau":
            scheduler.step(val_loss)
        elif schedule in ("cosine", "step"):
            scheduler.step()
    record.final_val = record.val_losses[-1]
    record.final_test = math.inf if record.diverged else run.evaluate("test")[0]
    if not math.isfinite(record.final_test):
        record.diverged, record.final_test = True, math.inf
    return record


def ratio_to(value: float, reference: float, cap: float = RATIO_CAP) -> float:
    """``value / reference``, within ``[1/cap, cap]``; a diverged (non-finite) side counts as ``cap`` times
    worse than the other: ``cap`` when ``value`` diverged, ``1/cap`` when only ``reference`` did, 1 when both did.
    A reference loss of exactly 0 (every sample right by a wide margin, in float32) is matched only by 0: 1, else ``cap``."""
    value_ok, reference_ok = math.isfinite(value), math.isfinite(reference)
    if not value_ok:
        return 1.0 if not reference_ok else cap
    if not reference_ok:
        return 1.0 / cap
    if reference <= 0.0:
        return 1.0 if value <= 0.0 else cap
    return min(max(value / reference, 1.0 / cap), cap)


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values]
    return float(math.exp(np.mean(np.log(vals)))) if vals else math.nan


@dataclass(frozen=True)
class Job:
    """One inner run for :func:`run_jobs`: the arguments of :func:`run_schedule`, which documents them."""

    task: TaskConfig
    schedule: str
    policy: PolicyNet | None = None
    seed_index: int = 0
    multiplier: float = math.nan
    device: str = "cpu"
    policy_accuracy: bool = True
    policy_options: Mapping[str, Any] | None = None


def _job(job: Job) -> RunRecord:
    torch.set_num_threads(1)
    return run_schedule(job.task, job.schedule, job.policy, seed_index=job.seed_index, multiplier=job.multiplier,
                        device=job.device, policy_accuracy=job.policy_accuracy, policy_options=job.policy_options)


def exit_with(parent_pid: int) -> None:
    """In a worker process: end it as soon as process ``parent_pid`` ends, however that ends.

    A worker started through the forkserver is the forkserver's child, and both outlive a parent that
    was killed (SIGKILL, the OOM killer): a pool worker waits on its job queue forever, holding its
    memory. A daemon thread here waits for the parent's exit (a pidfd where Linux has one, else a
    check every second) and then exits the process at once.
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent_pid)  # readable once the process has exited (zombie included)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd on this platform or kernel: poll
            while True:
                time.sleep(1.0)
                try:
                    os.kill(parent_pid, 0)
                except ProcessLookupError:
                    os._exit(1)
                except PermissionError:  # alive, or its pid reused by another user's process
                    pass
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{parent_pid}", daemon=True).start()


def make_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool for evaluation jobs (one torch thread each; ``workers`` defaults to the CPU count).

    Its workers end with the process that made the pool, even when that one is killed, and read local datasets
    where this process does (:func:`init_worker`).
    """
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=mp.get_context("forkserver"),
                               initializer=init_worker, initargs=init_worker_args())


def init_worker_args() -> tuple[int, str | None]:
    """:func:`init_worker`'s arguments for a worker of this process."""
    root = local_data.data_root()
    return os.getpid(), None if root is None else str(root)


def init_worker(parent_pid: int, data_root: str | None) -> None:
    """In a worker process: end with process ``parent_pid`` (:func:`exit_with`) and read local datasets under
    ``data_root``, the parent's root. (A forkserver's children inherit the environment the server started
    with, not the parent's current one.)"""
    exit_with(parent_pid)
    if data_root is not None and os.path.isdir(data_root):  # else a job that needs it says what is missing
        local_data.set_data_root(data_root)


def run_jobs(
    jobs: Sequence[Job],
    pool: Executor | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[RunRecord]:
    """Run evaluation jobs, in ``pool`` when given (results in job order)."""
    results: list[RunRecord] = []
    if pool is None:
        for job in jobs:
            results.append(_job(job))
            if progress:
                progress(1)
        return results
    for record in pool.map(_job, jobs):
        results.append(record)
        if progress:
            progress(1)
    return results


@dataclass
class Evaluation:
    """Scores of a policy and the baselines against the oracle on a set of tasks."""

    families: list[str]
    seeds: int
    multipliers: list[float]
    schedules: list[str]
    records: list[RunRecord]
    oracle: dict[str, float]
    """``"family/seed"`` → the oracle's final test loss."""
    policy_accuracy: bool = True
    """Whether the policy was given the validation accuracy of classification tasks."""
    epochs: tuple[int, int] | None = None
    """The epoch budget range the tasks were drawn with (None: each family's own)."""

    def ratio(self, record: RunRecord) -> float:
        return ratio_to(record.final_test, self.oracle[f"{record.family}/{record.seed}"])

    def select(self, schedule: str, multiplier: float, family: str | None = None) -> list[RunRecord]:
        return [r for r in self.records if r.schedule == schedule and r.multiplier == multiplier
                and (family is None or r.family == family)]

    def aggregate(self, schedule: str, multiplier: float, family: str | None = None) -> tuple[float, float]:
        """Geomean ratio to the oracle over each seed's tasks, as (mean, std) over seeds (for one family: one
        task per seed, so the mean over seeds of its ratio)."""
        per_seed = []
        for s in range(self.seeds):
            recs = [r for r in self.select(schedule, multiplier, family) if r.seed == s]
            if recs:
                per_seed.append(geomean(self.ratio(r) for r in recs))
        return float(np.mean(per_seed)), float(np.std(per_seed))

    def failures(self, schedule: str) -> dict[str, int]:
        """Divergences and finite blow-ups of ``schedule`` on tasks where cosine at the same LR had neither."""
        cosine = {(r.family, r.seed, r.multiplier): r for r in self.records if r.schedule == "cosine"}
        out = {"diverged": 0, "blew_up": 0, "tasks": 0}
        for r in self.records:
            ref = cosine.get((r.family, r.seed, r.multiplier))
            if r.schedule != schedule or ref is None or ref.diverged or ref.blew_up:
                continue
            out["tasks"] += 1
            out["diverged"] += r.diverged
            out["blew_up"] += r.blew_up
        return out

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> Evaluation:
        """The evaluation a :meth:`to_dict` (read back from JSON) holds: its scores are recomputed from its records.

        Standard JSON has no NaN or infinity, and ``train_controller.py evaluate`` writes them as ``null``: a null
        loss reads back as ``inf`` (a final or initial loss, an oracle: every score treats any non-finite value
        as diverged) or ``nan`` (an entry of a per-epoch loss list).

        Raises:
            ValueError: ``saved`` is not such a dict (its missing or malformed part is named).
        """

        def loss(value: Any) -> float:
            return math.inf if value is None else float(value)

        def record(r: Mapping[str, Any]) -> RunRecord:
            r = dict(r)
            for name in ("initial_test", "final_test", "final_val"):
                if name in r:
                    r[name] = loss(r[name])
            for name in ("train_losses", "val_losses"):
                if name in r:
                    r[name] = [math.nan if v is None else float(v) for v in r[name]]
            return RunRecord(**r)

        try:
            protocol = saved["protocol"]
            schedules = protocol.get("schedules") or list(next(iter(saved["summary"].values())))  # older files
            return cls(list(protocol["families"]), int(protocol["seeds"]), [float(m) for m in protocol["multipliers"]],
                       list(schedules), [record(r) for r in saved["records"]],
                       {str(k): loss(v) for k, v in saved["oracle"].items()},
                       bool(protocol.get("policy_accuracy", True)), check_epoch_range(protocol.get("epochs")))
        except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as err:
            raise ValueError(f"not a saved evaluation ({type(err).__name__}: {err})") from None

    def to_dict(self) -> dict[str, Any]:
        summary = {
            f"x{m:g}": {s: dict(zip(("mean", "std"), self.aggregate(s, m))) for s in self.schedules}
            for m in self.multipliers
        }
        per_family = {
            f: {f"x{m:g}": {s: self.aggregate(s, m, f)[0] for s in self.schedules} for m in self.multipliers}
            for f in self.families
        }
        return {
            "protocol": {"families": self.families, "seeds": self.seeds, "multipliers": self.multipliers,
                         "schedules": self.schedules, "oracle_grid": list(ORACLE_GRID), "ratio_cap": RATIO_CAP,
                         "policy_accuracy": self.policy_accuracy, "epochs": self.epochs},
            "summary": summary,
            "per_family": per_family,
            "failures": {s: self.failures(s) for s in self.schedules},
            "oracle": self.oracle,
            "records": [asdict(r) for r in self.records],
        }


def oracle_losses(records: Iterable[RunRecord]) -> dict[str, float]:
    """``"family/seed"`` → the oracle's final test loss: the best over that task's grid runs (negative multipliers),
    ``inf`` when every one diverged. The other records are ignored."""
    oracle: dict[str, float] = {}
    for r in records:
        if r.multiplier < 0:
            key = f"{r.family}/{r.seed}"
            oracle[key] = min(oracle.get(key, math.inf), r.final_test if math.isfinite(r.final_test) else math.inf)
    return oracle


def grid_search_picks(records: Iterable[RunRecord]) -> dict[tuple[str, int], RunRecord]:
    """``(family, seed) -> the grid run`` (negative multiplier) with the lowest final *validation* loss: the LR a grid
    search on the validation set picks (the middle of the grid when every run diverged). Other records are ignored."""
    grid: dict[tuple[str, int], list[RunRecord]] = {}
    for r in records:
        if r.multiplier < 0:
            grid.setdefault((r.family, r.seed), []).append(r)
    return {key: min((r for r in runs if math.isfinite(r.final_val)), key=lambda r: r.final_val,
                     default=sorted(runs, key=lambda r: r.multiplier)[len(runs) // 2]) for key, runs in grid.items()}


def evaluate_policy(
    policy: PolicyNet | None,
    families: Sequence[str],
    *,
    seeds: int = 3,
    multipliers: Sequence[float] = MULTIPLIERS,
    baselines: Sequence[str] = BASELINES,
    device: str = "cpu",
    pool: Executor | None = None,
    progress: Callable[[int], None] | None = None,
    policy_accuracy: bool = True,
    epochs: tuple[int, int] | None = None,
) -> Evaluation:
    """The full protocol of this module's docstring: policy, baselines and oracle on ``families``
    (``policy_accuracy=False``: the policy is given no validation accuracy, as a loop that passes none;
    ``epochs``: budgets drawn from this range rather than each family's)."""
    epochs = check_epoch_range(epochs)
    jobs: list[Job] = []
    for family in families:
        for multiplier in ORACLE_GRID:
            for i, task in enumerate(evaluation_tasks(family, seeds, multiplier, epochs=epochs)):
                jobs.append(Job(task, "cosine", None, i, -multiplier, device))  # negative: oracle grid
        for multiplier in multipliers:
            for i, task in enumerate(evaluation_tasks(family, seeds, multiplier, epochs=epochs)):
                if policy is not None:
                    jobs.append(Job(task, "policy", policy, i, multiplier, device, policy_accuracy))
                for name in baselines:
                    jobs.append(Job(task, name, None, i, multiplier, device))
    records = run_jobs(jobs, pool, progress)
    oracle = oracle_losses(records)
    schedules = (["policy"] if policy is not None else []) + list(baselines)
    return Evaluation(list(families), seeds, list(multipliers), schedules,
                      [r for r in records if r.multiplier > 0], oracle, policy_accuracy, epochs)


def n_jobs(families: Sequence[str], seeds: int, multipliers: Sequence[float], n_schedules: int) -> int:
    """How many inner runs :func:`evaluate_policy` makes (for progress bars)."""
    return len(families) * seeds * (len(ORACLE_GRID) + len(multipliers) * n_schedules)
