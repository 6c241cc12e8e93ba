"""Train, export and evaluate the learned LR controller.

    python train_controller.py train                  # PPO over the train families, tracked in MLflow
    python train_controller.py export RUN_DIR policy.safetensors
    python train_controller.py evaluate               # the shipped policy vs standard schedules

``train`` runs Stable-Baselines3 PPO on ``LRControl-v0`` over the train task families, evaluates the
deterministic policy on the validation families every ``--eval-every`` env steps (final validation
loss relative to cosine annealing from the same initial LR: below 1 means better than what a user
would do anyway), checkpoints every ``--checkpoint-every`` env steps (``--resume`` continues the
step counter and the MLflow run), and ends by exporting the best policy to ``OUT/policy.safetensors``.
Every run is tracked in MLflow: a local sqlite store (``./mlflow.db``) unless ``--tracking-uri``
names a server.

This file reads top to bottom: the config, MLflow tracking, the training loop with its callback,
``train(cfg)``, ``evaluate(...)``, then the thin click layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A tracking server that stops answering must cost seconds, not MLflow's default ~4 minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

import click  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.logger import KVWriter, Logger  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv  # noqa: E402
from tqdm import tqdm  # noqa: E402

from controller.checkpoint import default_policy_path, load_policy, save_policy  # noqa: E402
from controller.features import FEATURE_NAMES  # noqa: E402
from controller.policy import PolicyNet  # noqa: E402
from envs import (  # noqa: E402
    LOCAL_FAMILIES, TEST_FAMILIES, TRAIN_FAMILIES, VALIDATION_FAMILIES, EnvConfig, check_device, get_family,
    local_data, resolve_device,
)
from envs.tasks import check_epoch_range  # noqa: E402
from envs.tasks import check_local_data as _local_data_problems  # noqa: E402
from envs.batched import make_vec_env as batched_vec_env  # noqa: E402
from envs.evaluation import (  # noqa: E402
    BASELINES,
    MULTIPLIERS,
    SELECTION_SEED,
    Evaluation,
    Job,
    RunRecord,
    evaluate_policy,
    evaluation_tasks,
    geomean,
    init_worker,
    init_worker_args,
    make_pool,
    n_jobs,
    ratio_to,
    run_jobs,
)
from envs.export import policy_from_sb3, read_sb3_zip  # noqa: E402

STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoints"
POLICY_FILE = "policy.safetensors"
BEST_POLICY_FILE = "best_policy.safetensors"
UNLOGGED_FILE = "unlogged_metrics.jsonl"


# ==================================================================================================
# Config
# ==================================================================================================


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (logged as MLflow params; RNG state is not part of it)."""

    timesteps: int = 100_000
    """Total PPO env steps (one step = one inner epoch)."""
    n_envs: int = 16
    """Parallel environment slots, shared between the MLP families (batched in-process) and the others (one
    subprocess per slot, each drawing from all of them; in-process when only one such slot is left)."""
    seed: int = 0
    """Seed of PPO and of the environments' task draws."""
    families: tuple[str, ...] = TRAIN_FAMILIES
    """Task families episodes are drawn from."""
    epochs: tuple[int, int] | None = None
    """Epoch budget range (inclusive) of the training episodes and the periodic validation's tasks; None: each
    family's own (10–40; 10–30 for the recurrent and attention families and the local MLPs; 10–20 for moons_mlp
    and the local CNNs)."""
    out: str = "runs/default"
    """Output directory: checkpoints, state, exported policies."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: sqlite:///<cwd>/mlflow.db."""
    experiment: str = "lrcontrol"
    """MLflow experiment name."""
    n_steps: int = 64
    """PPO rollout length per env (a rollout is n_steps × n_envs env steps)."""
    batch_size: int = 128
    """PPO minibatch size."""
    learning_rate: float = 3e-4
    """PPO Adam learning rate."""
    n_epochs: int = 10
    """PPO epochs per rollout."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    ent_coef: float = 0.0
    """Entropy bonus."""
    net_arch: tuple[int, ...] = (64, 64)
    """Hidden layers of the policy and value networks."""
    checkpoint_every: int = 10_000
    """Env steps between checkpoints (SIGKILL loses at most this much plus one rollout; Ctrl-C or SIGTERM checkpoint
    the last update). Each holds the policy that collects its step: the last PPO update before it."""
    eval_every: int = 25_000
    """Env steps between validation evaluations (0: only at the end), of the policy that collects each such step."""
    eval_seeds: int = 1
    """Tasks per validation family and LR multiplier in each evaluation."""
    eval_families: tuple[str, ...] = VALIDATION_FAMILIES
    """Families of the periodic evaluation (never trained on)."""
    device: str = "cpu"
    """Device of the inner training runs ("auto": CUDA when available)."""
    registered_model: str = "lrcontrol-policy"
    """MLflow registered-model name of the exported policy ("" to skip registration)."""

    def __post_init__(self) -> None:
        if self.timesteps <= 0:
            raise ValueError(f"timesteps must be positive, got {self.timesteps}")
        if self.n_envs <= 0:
            raise ValueError(f"n_envs must be positive, got {self.n_envs}")
        if not 0 <= self.seed < 2**32:  # NumPy's legacy seeding, which SB3 calls, takes no other
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        for name in (*self.families, *self.eval_families):
            get_family(name)
        object.__setattr__(self, "epochs", check_epoch_range(self.epochs))
        if not self.experiment.strip():
            raise ValueError("experiment must name an MLflow experiment, got an empty name")
        check_device(self.device)  # a GPU this machine lacks is refused here, not inside the first inner run
        leaked = set(self.families) & set(VALIDATION_FAMILIES)
        if leaked:
            raise ValueError(f"validation families never train a policy; remove {sorted(leaked)} from families")
        if selected_on_training := sorted(set(self.eval_families) & set(self.families)):
            raise ValueError(f"eval_families select the policy on families it never trained on; {selected_on_training} "
                             "are also in families")
        for name, low, high in (("learning_rate", 0.0, math.inf), ("ent_coef", 0.0, math.inf), ("gamma", 0.0, 1.0),
                                ("gae_lambda", 0.0, 1.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high) or (name == "learning_rate" and value == 0):
                raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}]"
                                 f"{' and above 0' if name == 'learning_rate' else ''}, got {value}")
        reserved = set(self.families + self.eval_families) & set(TEST_FAMILIES)
        if reserved:
            raise ValueError(f"test families are for reporting only (`evaluate --families ...`), never to train or "
                             f"select a policy; remove {sorted(reserved)}")
        if self.batch_size > self.n_steps * self.n_envs:
            raise ValueError(f"batch_size {self.batch_size} exceeds the rollout size n_steps*n_envs = "
                             f"{self.n_steps * self.n_envs}")
        for name in ("checkpoint_every", "eval_every", "n_steps", "batch_size", "n_epochs", "eval_seeds"):
            if getattr(self, name) < 0 or (name != "eval_every" and getattr(self, name) == 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def params(self) -> dict[str, str]:
        """Flat string params for MLflow."""
        return {k: (",".join(map(str, v)) if isinstance(v, tuple) else str(v)) for k, v in dataclasses.asdict(self).items()}


# ==================================================================================================
# MLflow tracking that never stops training
# ==================================================================================================


def resolve_tracking_uri(uri: str | None) -> str:
    """None → the embedded sqlite store ``sqlite:///<cwd>/mlflow.db`` (MLflow 3's default); a sqlite URI with a
    relative path is made absolute, so that a run resumed from another directory finds its store."""
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    path = _sqlite_path(uri)
    return f"sqlite:///{path.resolve()}" if path is not None and not path.is_absolute() else uri


_IN_MEMORY = ("", "/", "/:memory:")
"""What a ``sqlite://`` URI names for an in-memory database (:func:`_sqlite_database`)."""


def _sqlite_database(uri: str) -> str | None:
    """What a ``sqlite://`` URI names, its query left out: ``/path/to/file.db``, or one of :data:`_IN_MEMORY` (None for
    other URIs)."""
    return uri[len("sqlite://") :].split("?", 1)[0] if uri.startswith("sqlite://") else None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs and in-memory databases)."""
    database = _sqlite_database(uri)
    if database is None or database in _IN_MEMORY or not database.startswith("/"):
        return None
    return Path(database[1:])


def check_experiment(uri: str, name: str) -> None:
    """Raise ``click.ClickException`` before any work if runs cannot be logged to experiment ``name`` at ``uri``:
    an empty name, or an experiment deleted there (MLflow refuses it only when the run is set up)."""
    if not name.strip():
        raise click.ClickException("--experiment must name an MLflow experiment, got an empty name")
    try:
        experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except mlflow.exceptions.MlflowException as err:
        raise click.ClickException(f"cannot use MLflow experiment {name!r} at {uri}: {err.message}") from None
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise click.ClickException(
            f"MLflow experiment {name!r} is deleted in {uri}: restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or choose another --experiment"
        )


def check_resumed_run(uri: str, run_id: str) -> None:
    """Raise ``click.ClickException`` before any work if the MLflow run that ``--resume`` continues is not at
    ``uri`` (a moved store, or another server)."""
    hint = "pass --tracking-uri with where the run's store is now"
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():  # checked first: opening it would create an empty store there
        raise click.ClickException(f"--resume: the run's MLflow store {path} does not exist; {hint}")
    check_tracking_uri(uri)
    try:
        run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise click.ClickException(f"--resume: MLflow run {run_id} is not in {uri}; {hint}") from None
    if run.info.lifecycle_stage == "deleted":
        raise click.ClickException(f"--resume: MLflow run {run_id} in {uri} was deleted; restore it first "
                                   f"(`MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {run_id}`)")


def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """Raise ``click.ClickException`` before any work if MLflow cannot use ``uri``.

    An http(s) server must answer ``/health`` within ``timeout`` seconds (MLflow's own retries take
    minutes). Any other URI must open as an MLflow store: an unknown scheme, a database driver that is
    not installed or a store MLflow refuses is named here, not in a traceback after the run started. An
    in-memory sqlite store opens but keeps nothing past this process: it is refused too.
    """
    if _sqlite_database(uri) in _IN_MEMORY:
        raise click.ClickException(
            f"{uri} is an in-memory MLflow store: the run and everything logged to it would be gone when this command "
            "ends (and --resume could not find it). Use sqlite:///path/to/mlflow.db (leave out --tracking-uri for "
            "./mlflow.db) or a server's http(s)://host:port."
        )
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as err:
            raise click.ClickException(
                f"cannot reach the MLflow tracking server at {uri} ({err}). Start it (e.g. `mlflow server --host "
                "127.0.0.1 --port 5000`) or leave out --tracking-uri to log to the local sqlite store."
            ) from None
        return
    try:
        mlflow.MlflowClient(tracking_uri=uri)  # opens the store (a new sqlite file gets its tables here)
    except Exception as err:  # MLflow raises many kinds: unknown scheme, missing driver, refused file store
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise click.ClickException(
            f"cannot use {uri!r} as an MLflow tracking URI: {reason}. Use http(s)://host:port for a server or "
            "sqlite:///path/to/mlflow.db for a local store (the default)."
        ) from None


class Tracker:
    """MLflow logging that survives a tracking server going away.

    Every call is guarded: on failure the values are appended to ``OUT/unlogged_metrics.jsonl`` (so
    nothing is lost), the server is left alone for ``retry_after`` seconds, and :meth:`summary`
    reports what did not reach MLflow.
    """

    def __init__(self, out: Path, retry_after: float = 30.0) -> None:
        self.out, self.retry_after = out, retry_after
        self.failed: dict[str, int] = {}
        self.first_error: str | None = None
        self._down_until = 0.0

    def _guard(self, what: str, fn: Any, record: dict[str, Any] | None = None) -> Any:
        if time.monotonic() >= self._down_until:
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
                self.first_error = self.first_error or f"{type(err).__name__}: {err}"[:300]
                self._down_until = time.monotonic() + self.retry_after
        self.failed[what] = self.failed.get(what, 0) + 1
        with open(self.out / UNLOGGED_FILE, "a") as f:
            f.write(json.dumps({"what": what, "time": time.time(), **(record or {})}, default=str) + "\n")
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if clean:
            self._guard("metrics", lambda: mlflow.log_metrics(clean, step=step), {"step": step, "metrics": clean})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._guard(f"artifact {path.name}", lambda: mlflow.log_artifact(str(path), artifact_path), {"path": str(path)})

    def call(self, what: str, fn: Any) -> Any:
        return self._guard(what, fn)

    def summary(self) -> str | None:
        if not self.failed:
            return None
        parts = ", ".join(f"{n}× {what}" for what, n in sorted(self.failed.items()))
        return (f"MLflow did not receive: {parts} (first error: {self.first_error}). "
                f"The values are kept in {self.out / UNLOGGED_FILE}; checkpoints and policies are in {self.out}.")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ==================================================================================================
# Validation during training
# ==================================================================================================


class Validator:
    """Scores a policy on the validation families against cosine annealing from the same initial LR.

    Score: geometric mean over tasks of (policy's final val loss ÷ cosine's), ratios within [1/10, 10],
    a diverged side counted as 10× worse. Below 1: better than cosine. Cosine runs are computed once
    and cached. The tasks come from ``SELECTION_SEED``, not from the seeds ``evaluate`` reports on.
    """

    def __init__(self, cfg: TrainConfig, pool: Any = None) -> None:
        self.cfg, self.pool = cfg, pool
        self.device = str(resolve_device(cfg.device))  # "auto" → cuda or cpu, as the environments resolve it
        self.tasks = [(family, i, m, task) for family in cfg.eval_families for m in MULTIPLIERS
                      for i, task in enumerate(evaluation_tasks(family, cfg.eval_seeds, m, SELECTION_SEED, cfg.epochs))]
        self._cosine: list[RunRecord] | None = None

    def __call__(self, net: PolicyNet) -> tuple[float, dict[str, float], list[RunRecord], list[RunRecord]]:
        device = self.device
        if self._cosine is None:
            self._cosine = run_jobs([Job(t, "cosine", None, i, m, device) for f, i, m, t in self.tasks], self.pool)
        policy = run_jobs([Job(t, "policy", net, i, m, device) for f, i, m, t in self.tasks], self.pool)
        ratios = [ratio_to(p.final_val, c.final_val) for p, c in zip(policy, self._cosine)]
        metrics = {"val/ratio_vs_cosine": geomean(ratios)}
        for m in MULTIPLIERS:
            metrics[f"val/ratio_vs_cosine_x{m:g}"] = geomean(r for r, p in zip(ratios, policy) if p.multiplier == m)
        for family in self.cfg.eval_families:
            metrics[f"val/{family}"] = geomean(r for r, p in zip(ratios, policy) if p.family == family)
        metrics["val/diverged"] = float(sum(p.diverged for p in policy))
        return metrics["val/ratio_vs_cosine"], metrics, policy, self._cosine


def plot_trajectories(policy: list[RunRecord], reference: list[RunRecord], path: Path, reference_name: str) -> Path:
    """PNG: per validation family, LR (top) and validation loss (bottom) per epoch, policy vs reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r.family for r in policy})
    fig, axes = plt.subplots(2, len(families), figsize=(3.2 * len(families), 5.5), squeeze=False)
    colors = {0.1: "tab:blue", 1.0: "tab:green", 10.0: "tab:red"}
    for col, family in enumerate(families):
        for recs, style, name in ((policy, "-", "policy"), (reference, ":", reference_name)):
            for r in recs:
                if r.family != family or r.seed != 0:
                    continue
                c = colors.get(r.multiplier, "k")
                epochs = np.arange(1, len(r.lrs) + 1)
                axes[0, col].plot(epochs, r.lrs, style, color=c, label=f"{name} ×{r.multiplier:g}")
                axes[1, col].plot(epochs, r.val_losses, style, color=c)
        axes[0, col].set_yscale("log")
        axes[1, col].set_yscale("log")
        axes[0, col].set_title(family, fontsize=9)
        axes[1, col].set_xlabel("epoch")
    axes[0, 0].set_ylabel("learning rate")
    axes[1, 0].set_ylabel("validation loss")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"solid: policy, dotted: {reference_name}; colour: initial LR × family default", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ==================================================================================================
# Training
# ==================================================================================================


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that ``json.dumps`` writes standard JSON
    (``null``) rather than the ``NaN``/``Infinity`` that jq, JavaScript and strict parsers refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def make_vec_env(cfg: TrainConfig) -> VecEnv:
    """``cfg.n_envs`` monitored LRControl-v0 slots: MLP families batched in one computation
    (``envs.batched``), the others as separate envs in subprocesses."""
    env_config = EnvConfig(families=cfg.families, device=cfg.device, budget_is_terminal=True, epochs=cfg.epochs)

    def subprocesses(fns: list[Any]) -> VecEnv:
        if len(fns) <= 1:
            return DummyVecEnv(fns)
        worker_args = init_worker_args()

        def in_worker(make: Any) -> Any:  # runs in the env's subprocess: it ends with this process, even a killed one
            init_worker(*worker_args)
            return make()

        return SubprocVecEnv([functools.partial(in_worker, fn) for fn in fns], start_method="forkserver")

    return batched_vec_env(cfg.families, cfg.n_envs, env_config, seed=cfg.seed, vec_env_cls=subprocesses)


class MLflowWriter(KVWriter):
    """SB3 logger output (episode return/length, PPO losses, fps) → one ``mlflow.log_metrics`` per iteration."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        metrics = {k: float(v) for k, v in key_values.items()
                   if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}
        self.tracker.log_metrics(metrics, step)

    def close(self) -> None:
        pass


def _next_multiple(step: int, every: int) -> float:
    """The first multiple of ``every`` after ``step`` (infinity for ``every`` 0: never)."""
    return (step // every + 1) * every if every else math.inf


class TrainingCallback(BaseCallback):
    """Progress bar, periodic checkpoints and periodic validation.

    SB3 calls the callback at every env step while it collects a rollout, and learns from the rollout only after it:
    inside a rollout the policy is the one the last update left, trained on the steps counted when the rollout
    started (:attr:`trained`). So checkpoints and validations are taken when a rollout starts and labelled with that
    count. One is due every ``checkpoint_every`` (``eval_every``) steps, and takes the policy that collects that step,
    the last update before it (none before the first update). A resume collects again what no update learned from.
    """

    def __init__(self, cfg: TrainConfig, out: Path, state: dict[str, Any], tracker: Tracker,
                 validator: Validator, show_progress: bool) -> None:
        super().__init__()
        self.cfg, self.out, self.state, self.tracker, self.validator = cfg, out, state, tracker, validator
        self.show_progress = show_progress
        self.trained: int = state["num_timesteps"]
        """Env steps the current weights learned from: what a checkpoint or validation of them is labelled."""
        self.next_checkpoint = _next_multiple(self.trained, cfg.checkpoint_every)
        self.next_eval = _next_multiple(self.trained, cfg.eval_every)
        self.bar: Any = None
        self._t0 = self._rollout_t0 = time.monotonic()
        self._steps0 = self._rollout_steps0 = state["num_timesteps"]

    def _on_training_start(self) -> None:
        # Redirected to a file, the bar updates once a minute instead of flooding the log
        self.bar = tqdm(total=self.cfg.timesteps, initial=self.state["num_timesteps"], unit="step",
                        dynamic_ncols=True, disable=not self.show_progress, desc="PPO",
                        mininterval=0.1 if sys.stderr.isatty() else 60.0)

    def _on_step(self) -> bool:
        n = self.model.num_timesteps
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            if n % (self.cfg.n_envs * 16) == 0:
                now = time.monotonic()
                sps = (n - self._steps0) / max(now - self._t0, 1e-9)
                self._t0, self._steps0 = now, n  # rate over the last window, not since start-up
                buf = self.model.ep_info_buffer
                ret = np.mean([e["r"] for e in buf]) if buf else float("nan")
                self.bar.set_postfix(steps_per_s=f"{sps:.0f}", ep_return=f"{ret:.3f}", refresh=False)
        return True

    def _on_rollout_start(self) -> None:
        self.trained = n = self.model.num_timesteps  # the update after the last rollout (if any) learned from all
        self._rollout_t0, self._rollout_steps0 = time.monotonic(), n
        last = n + self.cfg.n_steps * self.cfg.n_envs  # the last step this rollout collects
        if last >= self.next_eval:
            self.next_eval = _next_multiple(last, self.cfg.eval_every)
            if n > 0 and not (self.state["evals"] and self.state["evals"][-1]["step"] == n):  # not again on resume
                self.validate()
        if last >= self.next_checkpoint:
            self.next_checkpoint = _next_multiple(last, self.cfg.checkpoint_every)
            if n > self.state["num_timesteps"]:  # learned more than the last checkpoint holds
                self.checkpoint()

    def _on_rollout_end(self) -> None:
        sps = (self.model.num_timesteps - self._rollout_steps0) / max(time.monotonic() - self._rollout_t0, 1e-9)
        self.tracker.log_metrics({"time/env_steps_per_s": sps}, self.model.num_timesteps)

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def validate(self) -> float:
        n = self.trained
        net = policy_from_sb3(self.model.policy)
        score, metrics, policy_runs, cosine_runs = self.validator(net)
        self.tracker.log_metrics(metrics, n)
        self.state["evals"].append({"step": n, **metrics})
        if score < self.state["best_score"]:
            self.state.update(best_score=score, best_step=n)
            save_exported(net, self.out / BEST_POLICY_FILE, self.cfg, n, score, self.state.get("git_commit", "unknown"))
            self.state["best_runs"] = [dataclasses.asdict(r) for r in policy_runs]
        if self.bar is not None:
            self.bar.write(f"[{n} steps] validation ratio vs cosine {score:.3f} "
                           f"(best {self.state['best_score']:.3f} at {self.state['best_step']})")
        _atomic_write_json(self.out / STATE_FILE, self.state)
        return score

    def checkpoint(self) -> None:
        n = self.trained
        ckpt_dir = self.out / CHECKPOINT_DIR
        ckpt_dir.mkdir(exist_ok=True)
        path = ckpt_dir / f"step_{n:09d}.zip"
        tmp = ckpt_dir / f".tmp_{n}.zip"
        # the zip's own count (what PPO.load reads) is the steps learned from too, not those collected mid-rollout
        collected, self.model.num_timesteps = self.model.num_timesteps, n
        try:
            self.model.save(tmp)
        finally:
            self.model.num_timesteps = collected
        os.replace(tmp, path)
        self.state.update(num_timesteps=n, checkpoint=path.name)
        _atomic_write_json(self.out / STATE_FILE, self.state)
        for old in sorted(ckpt_dir.glob("step_*.zip"))[:-2]:  # keep the last two
            old.unlink()



def save_exported(net: PolicyNet, path: Path, cfg: TrainConfig, step: int, score: float | None, commit: str) -> Path:
    training = {"command": "python train_controller.py train", "config": cfg.params(), "timesteps": step,
                "validation_ratio_vs_cosine": score, "git_commit": commit}
    return save_policy(path, net, action_config=EnvConfig().action, training=training,
                       description=f"PPO policy after {step} env steps on families {', '.join(cfg.families)}")


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (what job schedulers and ``timeout`` send before a kill) raises KeyboardInterrupt, as Ctrl-C does,
    so that a long command stops the same way: ``train`` with a checkpoint, ``evaluate`` with its worker processes
    stopped rather than orphaned. Outside the main thread signals cannot be handled: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_state(state_path: Path, command: str) -> dict[str, Any]:
    """A run's ``state.json``; a ClickException naming the file when it is not a run's state (not JSON, not an
    object, or without the parts every command reads)."""
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        state, problem = None, f"is not valid JSON ({err})"
    else:
        problem = f"holds a JSON {type(state).__name__}, not an object"
    if isinstance(state, dict):
        kinds: dict[str, type | tuple[type, ...]] = {"config": dict, "mlflow_run_id": str, "num_timesteps": int,
                                                     "checkpoint": (str, type(None))}
        wrong = [f"{key!r} is {state[key]!r}" if key in state else f"no {key!r}"
                 for key, kind in kinds.items() if not isinstance(state.get(key, ...), kind)]
        if wrong:
            state, problem = None, f"has {', '.join(wrong)}"
    if not isinstance(state, dict):
        raise click.ClickException(f"{command}: {state_path} {problem}; it holds the run's state, so the run cannot "
                                   "be used until it is repaired")
    return state


def saved_run(out: Path) -> dict[str, Any]:
    """The saved state of the run in OUT that ``--resume`` continues; refused before any work when there is no run
    or its last checkpoint is missing or unreadable."""
    state_path = out / STATE_FILE
    if not state_path.exists():
        raise click.ClickException(f"--resume: no run to resume in {out} (no {STATE_FILE})")
    state = read_state(state_path, "--resume")
    if state.get("checkpoint"):
        checkpoint = out / CHECKPOINT_DIR / state["checkpoint"]
        if not checkpoint.is_file():
            raise click.ClickException(f"--resume: {checkpoint}, the run's last checkpoint, is missing; restore it "
                                       "or start a new run in another --out")
        if not zipfile.is_zipfile(checkpoint):
            older = [p.name for p in sorted(checkpoint.parent.glob("step_*.zip")) if p != checkpoint]
            raise click.ClickException(
                f"--resume: {checkpoint}, the run's last checkpoint, is not a readable zip (truncated?). "
                + (f"The one before it is {older[-1]}: point 'checkpoint' in {state_path} at it (and "
                   "'num_timesteps' at its step) to resume from there." if older else "No earlier one is kept.")
            )
    return state


def _check_out_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Validate OUT before any work; return the saved state when resuming (:func:`saved_run`)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise click.ClickException(f"output directory {out} is not writable: {err}") from None
    if resume:
        return saved_run(out)
    if (out / STATE_FILE).exists():
        raise click.ClickException(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if any((out / CHECKPOINT_DIR).glob("step_*.zip")):  # a new run would prune them as its own
        raise click.ClickException(f"{out / CHECKPOINT_DIR} holds checkpoints of an earlier run (with no "
                                   f"{STATE_FILE}); move them away, or choose another --out")
    return None


def train(cfg: TrainConfig, *, resume: bool = False, show_progress: bool = True) -> Path:
    """Train a controller; returns the path of the exported policy (``OUT/policy.safetensors``)."""
    check_local_data(cfg.families + cfg.eval_families)
    out = Path(cfg.out)
    created = not out.exists()
    saved = _check_out_dir(out, resume)
    if (saved is not None and saved.get("finished") and cfg.timesteps <= saved["num_timesteps"]
            and (out / POLICY_FILE).exists()):
        # nothing left to train: do not reopen the MLflow run, log its artefacts again or register another version
        policy_path = out / POLICY_FILE
        click.echo(f"{out}: this run finished at step {saved['num_timesteps']} (policy: {policy_path}); nothing to "
                   "do. Pass --resume with a larger --timesteps to train it further.")
        return policy_path
    if saved is not None:
        # the store the run was logged to, resolved when it started (not against this cwd), unless --tracking-uri
        # gave a new place for it
        moved = cfg.tracking_uri != saved["config"].get("tracking_uri")
        uri = resolve_tracking_uri(cfg.tracking_uri) if moved else saved.get("tracking_uri") or resolve_tracking_uri(None)
        check_resumed_run(uri, saved["mlflow_run_id"])
    else:
        uri = resolve_tracking_uri(cfg.tracking_uri)
        try:
            check_tracking_uri(uri)
            check_experiment(uri, cfg.experiment)
        except click.ClickException:
            if created:  # refused before any work: leave no empty OUT behind
                out.rmdir()
            raise
    torch.set_num_threads(1)

    mlflow.set_tracking_uri(uri)
    tracker = Tracker(out)
    if saved is not None:
        state = saved
        state.pop("finished", None)  # trained further: finished again only at the end
        # the next resume goes on with this one's total, device and store (its MLflow params keep the first values)
        state.update(tracking_uri=uri, config=dataclasses.asdict(cfg))
        _atomic_write_json(out / STATE_FILE, state)
        run = mlflow.start_run(run_id=state["mlflow_run_id"])
    else:
        mlflow.set_experiment(cfg.experiment)
        run = mlflow.start_run()
        state = {"mlflow_run_id": run.info.run_id, "tracking_uri": uri, "git_commit": _git_commit(),
                 "num_timesteps": 0, "checkpoint": None,
                 "best_score": math.inf, "best_step": None, "evals": [], "config": dataclasses.asdict(cfg)}
        tracker.call("params", lambda: mlflow.log_params(cfg.params()))
        tracker.call("tags", lambda: mlflow.set_tags({"git_commit": state["git_commit"], "command": " ".join(sys.argv)}))
        _atomic_write_json(out / STATE_FILE, state)

    vec_env = make_vec_env(cfg)
    pool = make_pool(workers=max(1, min(os.cpu_count() or 1, 4)))
    try:
        model = PPO(
            "MlpPolicy", vec_env, n_steps=cfg.n_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
            n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, ent_coef=cfg.ent_coef,
            policy_kwargs={"net_arch": {"pi": list(cfg.net_arch), "vf": list(cfg.net_arch)},
                           "activation_fn": torch.nn.Tanh},
            seed=cfg.seed, device="cpu", verbose=0,
        )
        if state.get("checkpoint"):
            # pickle-free: weights and optimizer state only (torch.load with weights_only=True)
            model.set_parameters(str(out / CHECKPOINT_DIR / state["checkpoint"]), exact_match=True)
            model.num_timesteps = state["num_timesteps"]
        # PPO seeded the envs with cfg.seed; a resumed run draws fresh tasks instead of replaying them.
        vec_env.seed(cfg.seed + 7919 * state["num_timesteps"])
        model.set_logger(Logger(folder=None, output_formats=[MLflowWriter(tracker)]))
        validator = Validator(cfg, pool)
        callback = TrainingCallback(cfg, out, state, tracker, validator, show_progress)
        remaining = cfg.timesteps - state["num_timesteps"]
        try:
            with _sigterm_as_keyboard_interrupt():
                if remaining > 0:
                    model.learn(total_timesteps=remaining, callback=callback, reset_num_timesteps=False)
                    model.logger.dump(model.num_timesteps)  # SB3 dumps before each update: flush the last losses
                callback.init_callback(model)
                callback.trained = model.num_timesteps  # learn() returns after an update that learned from all
                callback.checkpoint()  # before the final validation, which can take minutes: nothing to lose there
                if not state["evals"] or state["evals"][-1]["step"] != callback.trained:
                    callback.validate()  # a resumed run that was stopped here does it again
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was learned since the last checkpoint
            collected = state["num_timesteps"]
            if getattr(callback, "model", None) is not None:
                collected = callback.model.num_timesteps
                callback.checkpoint()
            learned = state["num_timesteps"]
            where = f"at step {collected}" + ("" if collected == learned else (
                f" (the last PPO update learned from {learned} steps: a resume collects the steps after them again)"))
            click.echo(f"\ninterrupted {where}, checkpoint saved: continue with "
                       f"`python train_controller.py train --out {out} --resume`", err=True)
            raise

        policy_path = out / POLICY_FILE
        shutil.copyfile(out / BEST_POLICY_FILE, policy_path)
        best_runs = [RunRecord(**r) for r in state["best_runs"]]
        png = plot_trajectories(best_runs, validator._cosine or [], out / "validation_trajectories.png", "cosine")
        tracker.log_artifact(policy_path, "policy")
        tracker.log_artifact(png, "plots")
        tracker.log_metrics({"best/val_ratio_vs_cosine": state["best_score"], "best/step": state["best_step"]},
                            model.num_timesteps)
        if cfg.registered_model:
            _log_pyfunc(tracker, policy_path, cfg.registered_model)
        tracker.call("end_run", lambda: mlflow.end_run("FINISHED"))
        state["finished"] = True  # a later --resume with no more timesteps has nothing to do
        _atomic_write_json(out / STATE_FILE, state)
    finally:
        try:
            vec_env.close()
        except (EOFError, OSError):  # subprocess envs a Ctrl-C to the whole process group already stopped
            pass
        pool.shutdown(cancel_futures=True)
        if mlflow.active_run() is not None:
            tracker.call("end_run", lambda: mlflow.end_run("KILLED"))
    message = tracker.summary()
    if message:
        click.echo(f"warning: {message}", err=True)
    click.echo(f"policy: {policy_path} (best validation ratio vs cosine {state['best_score']:.3f} at step "
               f"{state['best_step']}); MLflow run {state['mlflow_run_id']} at {uri}")
    return policy_path


def _pinned(*packages: str) -> list[str]:
    """``name==version`` of each installed package (a local build tag such as torch's ``+cpu`` dropped): the model's
    environment is the one it was logged from, not whatever is newest when someone serves it."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def _log_pyfunc(tracker: Tracker, policy_path: Path, name: str) -> None:
    import pandas as pd
    from mlflow.models import infer_signature

    code = Path(__file__).resolve().parent / "controller" / "integrations" / "mlflow_pyfunc.py"
    # named columns: MLflow then matches a table's features by name, never by position
    obs = pd.DataFrame(np.zeros((2, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
    signature = infer_signature(obs, np.ones(2))
    tracker.call("model", lambda: mlflow.pyfunc.log_model(
        name="policy_model", python_model=str(code), artifacts={"policy": str(policy_path)},
        code_paths=[str(Path(__file__).resolve().parent / "controller")], signature=signature, input_example=obs,
        pip_requirements=_pinned("torch", "numpy", "safetensors", "mlflow", "pandas"), registered_model_name=name,
    ))


# ==================================================================================================
# Export and evaluation
# ==================================================================================================


def export(source: Path, out: Path) -> Path:
    """An SB3 ``.zip`` or a training run directory → a pickle-free policy file at ``out``."""
    if source.is_dir():
        state_path = source / STATE_FILE
        if not state_path.exists():
            raise click.ClickException(f"{source} is not a training run directory (no {STATE_FILE})")
        state = read_state(state_path, "export")
        if not state.get("checkpoint"):
            raise click.ClickException(f"{source} has no checkpoint yet")
        zip_path = source / CHECKPOINT_DIR / state["checkpoint"]
    else:
        zip_path = source
    if out.is_file() and zipfile.is_zipfile(out):  # the source itself, or another checkpoint: never overwritten
        raise click.ClickException(f"{out} is a zip archive (an SB3 checkpoint?); exporting over it would lose it, "
                                   "so choose another OUT (a .safetensors path)")
    try:
        net = read_sb3_zip(zip_path)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    try:
        return save_policy(out, net, action_config=EnvConfig().action,
                           training={"exported_from": str(zip_path)}, description=f"exported from {zip_path.name}")
    except OSError as err:
        raise click.ClickException(f"cannot write {out}: {err}") from None


def format_table(ev: Evaluation) -> str:
    """The aggregate table (geomean ratio to the oracle over each seed's tasks, mean ± std over seeds, per
    multiplier), then one row per family and multiplier (the mean over seeds of its one task's ratio)."""
    lines = [] if ev.epochs is None else [f"epoch budgets drawn from {ev.epochs[0]}-{ev.epochs[1]}", ""]
    lines.append(f"{'schedule':10s} " + " ".join(f"{'x' + format(m, 'g'):>15s}" for m in ev.multipliers))
    for s in ev.schedules:
        cells = [f"{ev.aggregate(s, m)[0]:7.3f} ± {ev.aggregate(s, m)[1]:5.3f}" for m in ev.multipliers]
        lines.append(f"{s:10s} " + " ".join(f"{c:>15s}" for c in cells))
    lines.append("")
    lines.append("per family, mean over seeds:")
    lines.append(f"{'family':18s} {'mult':>5s} " + " ".join(f"{s:>9s}" for s in ev.schedules))
    for f in ev.families:
        for m in ev.multipliers:
            lines.append(f"{f:18s} {'x' + format(m, 'g'):>5s} " +
                         " ".join(f"{ev.aggregate(s, m, f)[0]:9.3f}" for s in ev.schedules))
    fails = ev.failures(ev.schedules[0])
    lines.append("")
    lines.append(f"{ev.schedules[0]}: {fails['diverged']} divergences and {fails['blew_up']} finite blow-ups on "
                 f"{fails['tasks']} tasks where cosine had neither")
    return "\n".join(lines)


def evaluate(policy: Path | None, families: Sequence[str], seeds: int, out: Path, tracking_uri: str | None,
             experiment: str, workers: int, device: str = "cpu", show_progress: bool = True,
             policy_accuracy: bool = True, epochs: tuple[int, int] | None = None) -> Evaluation:
    """Run the evaluation protocol of ``envs.evaluation`` and report it (table, JSON, PNG, MLflow); ``epochs``: draw
    the tasks' budgets from this range rather than each family's."""
    try:
        device = str(resolve_device(device))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--device") from None
    try:
        net = load_policy(policy)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    check_local_data(families)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.ClickException(f"cannot create {out}: {err}") from None
    uri = resolve_tracking_uri(tracking_uri)
    try:
        check_tracking_uri(uri)  # last: a new sqlite store takes seconds to set up
        check_experiment(uri, experiment)  # a deleted one would fail only after all the runs
    except click.ClickException:
        if created:  # refused before any work: leave no empty OUT behind
            out.rmdir()
        raise
    total = n_jobs(families, seeds, MULTIPLIERS, 1 + len(BASELINES))
    pool = make_pool(workers)
    try:
        with _sigterm_as_keyboard_interrupt(), tqdm(total=total, unit="run", desc="evaluate", disable=not show_progress,
                                                    mininterval=0.1 if sys.stderr.isatty() else 60.0) as bar:
            ev = evaluate_policy(net, families, seeds=seeds, device=device, pool=pool, progress=bar.update,
                                 policy_accuracy=policy_accuracy, epochs=epochs)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the workers too (the queued runs are dropped, not waited for)
        click.echo(f"\ninterrupted: nothing written to {out}", err=True)
        raise
    finally:
        pool.shutdown(cancel_futures=True)
    table = format_table(ev)
    click.echo(table)
    result = ev.to_dict()
    result["policy"] = {"path": str(policy or default_policy_path()), "metadata": net.metadata}
    # standard JSON: a diverged run's non-finite losses are null
    (out / "evaluation.json").write_text(json.dumps(strict_json(result), indent=1, default=str, allow_nan=False))
    (out / "evaluation.txt").write_text(table + "\n")
    best_baseline = min(BASELINES, key=lambda s: ev.aggregate(s, 1.0)[0])
    png = plot_trajectories([r for r in ev.records if r.schedule == "policy"],
                            [r for r in ev.records if r.schedule == best_baseline],
                            out / "evaluation_trajectories.png", best_baseline)
    mlflow.set_tracking_uri(uri)
    tracker = Tracker(out)
    # the results are written: a tracking server that went away during the runs costs only the MLflow record
    if tracker.call("run", lambda: (mlflow.set_experiment(experiment), mlflow.start_run(run_name="evaluate"))):
        tracker.call("params", lambda: mlflow.log_params({"policy": str(policy or "default"), "families":
                                                           ",".join(families), "seeds": seeds,
                                                           "policy_accuracy": policy_accuracy,
                                                           "epochs": "family" if epochs is None else
                                                           "-".join(map(str, epochs))}))
        metrics = {f"{s}/x{m:g}": ev.aggregate(s, m)[0] for s in ev.schedules for m in ev.multipliers}
        tracker.log_metrics(metrics, 0)
        for path in (out / "evaluation.json", out / "evaluation.txt", png):
            tracker.log_artifact(path)
        tracker.call("run end", mlflow.end_run)
    message = tracker.summary()
    if message:
        click.echo(f"warning: {message}", err=True)
    click.echo(f"wrote {out / 'evaluation.json'}, {out / 'evaluation.txt'} and {png}")
    return ev


# ==================================================================================================
# CLI
# ==================================================================================================

_D = TrainConfig()


FAMILY_SPLITS = {"train": TRAIN_FAMILIES, "validation": VALIDATION_FAMILIES, "test": TEST_FAMILIES,
                 "local": LOCAL_FAMILIES}
"""Names that stand for a whole split in ``--families`` / ``--eval-families``."""


def _families(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    names = tuple(dict.fromkeys(f for name in names for f in FAMILY_SPLITS.get(name, (name,))))  # splits expanded
    if not names:
        raise click.BadParameter("give at least one family")
    for name in names:
        try:
            get_family(name)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
    return names


def _data_root(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        local_data.set_data_root(value)  # this process; worker processes get it from init_worker
    return value


data_root_option = click.option(
    "--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), envvar=local_data.DATA_ROOT_ENV,
    show_envvar=True, callback=_data_root, expose_value=False, is_eager=True,
    help=f"Root of a local torchvision download (the root= you gave torchvision.datasets), read by the local "
         f"families ({','.join(LOCAL_FAMILIES)}). Nothing is downloaded.")


def check_local_data(families: Sequence[str]) -> None:
    """:func:`envs.check_local_data` as a ``click.ClickException``: missing or broken local data is reported before
    any work."""
    try:
        _local_data_problems(families)
    except ValueError as err:
        raise click.ClickException(str(err)) from None


def _epochs(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.split(",")]
        return check_epoch_range(parts * 2 if len(parts) == 1 else parts)  # one number: that budget
    except ValueError:
        raise click.BadParameter(f"expected MIN,MAX (or one number) with 2 <= MIN <= MAX, got {value!r}") from None


def _net(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer sizes, got {value!r}") from None
    if not sizes or min(sizes) <= 0:
        raise click.BadParameter(f"layer sizes must be positive integers, got {value!r}")
    return sizes


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def cli() -> None:
    """Train, export and evaluate the learned LR controller."""


@cli.command("train")
@click.option("--timesteps", type=click.IntRange(min=1), default=_D.timesteps, help="Total PPO env steps (one step = one inner epoch), rounded up to whole rollouts of n-steps × n-envs.")
@click.option("--n-envs", type=click.IntRange(min=1), default=_D.n_envs, help="Parallel env slots, shared between the MLP families (batched in-process) and the others (a subprocess per slot, each drawing from all of them).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=_D.seed, help="Seed of PPO and of the task draws.")
@click.option("--families", callback=_families, default=",".join(_D.families), help="Comma-separated train task families; 'train' or 'local' stands for that whole group.")
@click.option("--epochs", callback=_epochs, default=None, metavar="MIN,MAX", help="Epoch budget range of the training episodes and of the periodic validation's tasks (one number: that budget). Default: each family's own (10-40; 10-30 for the recurrent and attention families and the local MLPs; 10-20 for moons_mlp and the local CNNs).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=_D.out, help="Output directory (checkpoints, state, exported policy).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI, e.g. http://127.0.0.1:5000. Default: sqlite:///./mlflow.db (no server).")
@click.option("--experiment", default=_D.experiment, help="MLflow experiment name.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (same MLflow run, step counter continued) with its saved options: only --timesteps, --device and --tracking-uri (where the run's store is now) may change, and the next --resume keeps them. A finished run needs a larger --timesteps to train further.")
@click.option("--n-steps", type=click.IntRange(min=1), default=_D.n_steps, help="PPO rollout length per env.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_D.batch_size, help="PPO minibatch size.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=_D.learning_rate, help="PPO learning rate.")
@click.option("--n-epochs", type=click.IntRange(min=1), default=_D.n_epochs, help="PPO epochs per rollout.")
@click.option("--gamma", type=click.FloatRange(0, 1), default=_D.gamma, help="PPO discount factor per epoch (1: undiscounted, so an episode's return is log(first epoch's val loss / last epoch's), unless the run diverged).")
@click.option("--gae-lambda", type=click.FloatRange(0, 1), default=_D.gae_lambda, help="PPO GAE lambda.")
@click.option("--ent-coef", type=click.FloatRange(min=0), default=_D.ent_coef, help="PPO entropy bonus.")
@click.option("--net-arch", callback=_net, default=",".join(map(str, _D.net_arch)), help="Hidden layer sizes of policy and value nets.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=_D.checkpoint_every, help="Env steps between checkpoints. Each holds the policy that collects its step (the last PPO update before it), labelled with the steps that update learned from; a SIGKILL loses at most this much plus one rollout.")
@click.option("--eval-every", type=click.IntRange(min=0), default=_D.eval_every, help="Env steps between validation evaluations (0: only at the end), of the policy that collects each such step (the last PPO update before it), labelled with the steps it learned from.")
@click.option("--eval-seeds", type=click.IntRange(min=1), default=_D.eval_seeds, help="Tasks per validation family and LR multiplier.")
@click.option("--eval-families", callback=_families, default=",".join(_D.eval_families), help="Comma-separated validation families of the periodic evaluation; 'validation' stands for that whole group.")
@click.option("--device", default=_D.device, help='Device of the inner runs: cpu, cuda, cuda:N, or "auto" (CUDA when available).')
@data_root_option
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_command(resume: bool, no_progress: bool, out: Path, **kwargs: Any) -> None:
    """Train a controller with PPO over the train families and export the best policy to OUT/policy.safetensors.

    With --resume the run goes on with its saved configuration: only --timesteps (the new total), --device (the
    machine may differ) and --tracking-uri (the run's MLflow store moved; the run must be there) can change; any
    other option given with a value other than the saved one is refused.
    """
    try:
        if resume:
            ctx = click.get_current_context()
            given = {k for k in kwargs if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
            cfg = resume_config(saved_run(out)["config"], kwargs, given, out)
        else:
            cfg = TrainConfig(out=str(out), **kwargs)
    except ValueError as err:  # e.g. a resumed run's CUDA device on a machine without one
        raise click.UsageError(str(err)) from None
    train(cfg, resume=resume, show_progress=not no_progress)


RESUME_OVERRIDES = ("timesteps", "device", "tracking_uri")
"""The options a resumed run may change: the total to reach, the device of the machine it now runs on, and where
its MLflow store now is (the run must be there)."""


def resume_config(saved: dict[str, Any], options: dict[str, Any], given: set[str], out: Path) -> TrainConfig:
    """The configuration a resumed run goes on with: the saved one, with :data:`RESUME_OVERRIDES` from
    ``options`` where ``given`` names them.

    Raises:
        ValueError: an option in ``given`` (set on the command line) other than those has a value that differs
            from the saved one: it would be silently ignored otherwise (the experiment name included: the run's
            MLflow record stays where it is).
    """
    saved = dict(saved)
    for key in ("families", "eval_families", "net_arch"):
        saved[key] = tuple(saved[key])
    if saved.get("epochs") is not None:  # JSON made the range a list; older runs have none
        saved["epochs"] = tuple(saved["epochs"])
    differ = sorted(k for k in given - set(RESUME_OVERRIDES) if k in saved and options[k] != saved[k])
    if differ:
        shown = "; ".join(f"--{k.replace('_', '-')} (saved: {saved[k]!r}, given: {options[k]!r})" for k in differ)
        raise ValueError(f"--resume continues the run in {out} with its saved configuration, and these options differ "
                         f"from it: {shown}. Leave them out, or start a new run in another --out")
    changed = {k: options[k] for k in RESUME_OVERRIDES if k in given}  # else the saved total: not the default's
    if "tracking_uri" in changed:  # against this directory: the same relative URI as the saved one may be a moved store
        changed["tracking_uri"] = resolve_tracking_uri(changed["tracking_uri"])
    return TrainConfig(**{**saved, **changed, "out": str(out)})


@cli.command("export")
@click.argument("source", type=click.Path(exists=True, path_type=Path), metavar="RUN_DIR_OR_ZIP")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def export_command(source: Path, out: Path) -> None:
    """Convert an SB3 PPO .zip (or a training run's latest checkpoint) into a pickle-free policy file.

    Nothing in the zip is unpickled: weights are read with torch.load(weights_only=True).
    """
    path = export(source, out)
    click.echo(f"wrote {path}")


@cli.command("evaluate")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Policy file to evaluate. Default: the bundled default policy.")
@click.option("--families", callback=_families, default=",".join(VALIDATION_FAMILIES), help="Comma-separated families to evaluate on; 'train', 'validation', 'test' or 'local' stands for that whole group. "
              f"The test families ({','.join(TEST_FAMILIES)}) are for reporting only: never trained or selected on. "
              "The local families read image datasets from --data-root.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, help="Tasks per family (each at x0.1, x1 and x10 of the default LR).")
@click.option("--epochs", callback=_epochs, default=None, metavar="MIN,MAX", help="Draw each task's epoch budget from this range (one number: that budget), e.g. 100 for long runs. Default: each family's own (10-40; 10-30 for the recurrent and attention families and the local MLPs; 10-20 for moons_mlp and the local CNNs).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/evaluation"), help="Where the table, JSON and PNG go.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI. Default: sqlite:///./mlflow.db.")
@click.option("--experiment", default="lrcontrol-evaluation", help="MLflow experiment name.")
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default="one per CPU", help="Parallel inner runs.")
@click.option("--device", default="cpu", help='Device of the inner runs: cpu, cuda, cuda:N, or "auto" (CUDA when available).')
@data_root_option
@click.option("--no-accuracy", is_flag=True, help="Give the policy no validation accuracy (as a training loop that "
              "passes only the losses). By default classification tasks pass it; the baselines never use it.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def evaluate_command(policy: Path | None, families: tuple[str, ...], seeds: int, epochs: tuple[int, int] | None,
                     out: Path, tracking_uri: str | None, experiment: str, workers: int, device: str,
                     no_accuracy: bool, no_progress: bool) -> None:
    """Compare a policy (run as controller.PolicyScheduler) with constant, cosine, step, OneCycle and
    ReduceLROnPlateau schedules, scored against a per-task cosine LR grid search (the oracle)."""
    evaluate(policy, families, seeds, out, tracking_uri, experiment, workers, device, show_progress=not no_progress,
             policy_accuracy=not no_accuracy, epochs=epochs)


if __name__ == "__main__":
    cli()
