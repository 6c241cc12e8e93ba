"""``LRControlEnv``: an agent sets the learning rate of a real PyTorch training run, once per epoch."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from controller.actions import ActionConfig, next_lr
from controller.features import CLIP, N_FEATURES, FeatureBuilder
from envs.evaluation import run_schedule
from envs.inner import EpochResult, InnerRun, TorchRun
from envs.tasks import TRAIN_FAMILIES, TaskConfig, check_epoch_range, check_lr_multiplier, get_family


@dataclass(frozen=True)
class EnvConfig:
    """How episodes are drawn and scored."""

    families: tuple[str, ...] = TRAIN_FAMILIES
    """Task families episodes are drawn from (uniformly); one name alone is read as a one-family tuple."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    num_threads: int | None = 1
    """torch intra-op threads set when the env is built (None: leave torch's setting alone)."""
    action: ActionConfig = field(default_factory=ActionConfig)
    """Action map and safety rule (stored in exported policy files)."""
    divergence_penalty: float = 3.0
    """A diverged episode's return is -divergence_penalty (as if the final val loss were e^3 × the first)."""
    explode_ratio: float = 10.0
    """A finite val loss above explode_ratio × the untrained model's val loss counts as divergence."""
    lr_multiplier: float | None = None
    """Initial LR = family default × this; None draws it log-uniformly over three decades."""
    epochs: tuple[int, int] | None = None
    """Epoch budgets are drawn from this range (inclusive, from 2) instead of each family's (10–40; 10–30 for the
    recurrent and attention families and the local MLPs; 10–20 for moons_mlp and the local CNNs)."""
    budget_is_terminal: bool = False
    """Report the end of the epoch budget as ``terminated`` instead of ``truncated``. For RL training: the
    budget is part of the task (observed as ``progress``), so nothing should be bootstrapped past it."""
    reward: Literal["log_val", "vs_cosine"] = "log_val"
    """"log_val": r = Δ ln val loss. "vs_cosine": the same minus cosine annealing's Δ on the same task and seed
    (a reference run per episode, twice the compute): the return becomes ln(cosine's final val / the policy's)."""

    def __post_init__(self) -> None:
        # one family by name (not its letters); a list becomes a tuple
        if isinstance(self.families, (set, frozenset)):
            raise ValueError("EnvConfig.families must be ordered (a tuple or list): a set's order changes between "
                             "processes, so the same seed would draw other families")
        families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        object.__setattr__(self, "families", families)
        if not self.families:
            raise ValueError("EnvConfig.families is empty")
        for name in self.families:
            get_family(name)
        if not (math.isfinite(self.divergence_penalty) and self.divergence_penalty >= 0):
            raise ValueError(f"divergence_penalty must be a finite number >= 0, got {self.divergence_penalty}")
        check_lr_multiplier(self.lr_multiplier)  # here too: a bad one is named when the config is built
        object.__setattr__(self, "epochs", check_epoch_range(self.epochs))
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                                             or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive int (or None), got {self.num_threads!r}")
        if not self.explode_ratio > 1:
            raise ValueError(f"explode_ratio must be > 1, got {self.explode_ratio}")
        if self.reward not in ("log_val", "vs_cosine"):
            raise ValueError(f"reward must be 'log_val' or 'vs_cosine', got {self.reward!r}")
        if not isinstance(self.action, ActionConfig):
            raise ValueError(f"action must be a controller.actions.ActionConfig, got {self.action!r}")
        if not isinstance(self.budget_is_terminal, bool):
            raise ValueError(f"budget_is_terminal must be True or False, got {self.budget_is_terminal!r}")


def check_device(device: str | torch.device) -> torch.device:
    """The device ``device`` names ("auto": CUDA when available, else CPU), with no side effect.

    Raises:
        ValueError: not a device name, a device type other than CPU and CUDA (``mps``, ``meta``, …), or a
            device this machine does not have (CUDA on a CPU-only torch build or with no GPU visible, a GPU
            index beyond the visible ones), so that a command can say so before any work rather than fail
            inside its first inner run.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if resolved.type not in ("cpu", "cuda"):  # mps, xpu, meta, …: torch names them, the inner runs never ran there
        raise ValueError(f"device {str(device)!r} is not supported: inner runs run on 'cpu', 'cuda', 'cuda:N' "
                         "or 'auto'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why}; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: "
                             f"{torch.cuda.device_count()} CUDA device(s) visible")
    return resolved


def resolve_device(device: str | torch.device) -> torch.device:
    """:func:`check_device`, then set up the process for deterministic inner runs on that device.

    On CUDA this switches the process to deterministic kernels (cuDNN deterministic, torch's
    deterministic algorithms with a fixed cuBLAS workspace), so that the same seed gives the same
    trajectory there too: cuDNN convolutions and embedding backward passes otherwise differ from run to
    run in the last bits. Inner runs are small; the cost is minor.
    """
    resolved = check_device(device)
    if resolved.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return resolved


def _info_float(x: float | None) -> float:
    """Info values stay comparable across seeded runs: NaN is reported as inf ("infinitely bad")."""
    if x is None:
        return -1.0  # not defined (regression has no accuracy)
    return x if not math.isnan(x) else math.inf


class Episode:
    """The per-episode bookkeeping shared by :class:`LRControlEnv` and the batched vector env.

    Turns the :class:`EpochResult` of each epoch into an observation, a reward and the episode-end
    flags, and an action into the next LR (action map + safety rule of :mod:`controller.actions`).
    """

    def __init__(self, task: TaskConfig, config: EnvConfig, reference: list[float] | None = None) -> None:
        """
        Args:
            task: the episode's inner task.
            config: the env config (reward, penalty, safety rule).
            reference: for ``reward="vs_cosine"``, the validation losses of the cosine reference run
                after each epoch (epoch 1 first).
        """
        if config.reward == "vs_cosine" and reference is None:
            raise ValueError("reward 'vs_cosine' needs the reference run's validation losses")
        self.task, self.config = task, config
        self.reference = reference
        self.features = FeatureBuilder(task.epochs, task.lr, task.optimizer)
        self.episode_return = 0.0
        self.epoch = 0
        self.initial_val = math.inf
        self.first_val: float | None = None
        self.prev_val: float | None = None
        self.diverged = False
        self.cut = False

    def _is_diverged(self, result: EpochResult) -> bool:
        return not result.finite or result.val_loss > self.config.explode_ratio * self.initial_val

    def start(self, initial_val: float, result: EpochResult, lr: float) -> tuple[np.ndarray, dict[str, Any]]:
        """The observation after the first epoch (trained at the initial LR).

        Args:
            initial_val: the untrained model's validation loss (the reference for divergence).
            result: the first epoch's result.
            lr: the LR the first epoch ran with.
        """
        self.epoch = 1
        self.initial_val = initial_val if math.isfinite(initial_val) else math.inf
        self.diverged = self._is_diverged(result)
        if not self.diverged:
            self.first_val = self.prev_val = result.val_loss
        obs = self.features.observe(epoch=1, lr=lr, train_loss=result.train_loss, val_loss=result.val_loss,
                                    val_accuracy=result.val_accuracy, stats=result.stats)
        return obs, self.info(result, lr)

    def decide(self, lr: float, action: float) -> float:
        """The LR for the next epoch: action map, then the safety rule."""
        new_lr, self.cut = next_lr(lr, self.task.lr, action, val_loss=self.features.last_val,
                                   best_val_loss=self.features.best_before_last, config=self.config.action)
        return new_lr

    def advance(self, result: EpochResult, lr: float) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Observation, reward, terminated, truncated and info after one more epoch at ``lr``."""
        self.epoch += 1
        obs = self.features.observe(epoch=self.epoch, lr=lr, train_loss=result.train_loss,
                                    val_loss=result.val_loss, val_accuracy=result.val_accuracy, stats=result.stats)
        if self._is_diverged(result):
            self.diverged = True
            return obs, self.divergence_reward(), True, False, self.info(result, lr)
        assert self.prev_val is not None
        # a loss of exactly 0 (every validation sample right by a wide margin, in float32) is finite: floor it
        reward = math.log(max(self.prev_val, 1e-30)) - math.log(max(result.val_loss, 1e-30)) - self._reference_gain()
        self.prev_val = result.val_loss
        done = self.epoch >= self.task.epochs
        reward = float(np.clip(reward, -50.0, 50.0))
        self.episode_return += reward
        terminal = done and self.config.budget_is_terminal
        return obs, reward, terminal, done and not terminal, self.info(result, lr)

    def _reference_gain(self) -> float:
        """ln(c_{t-1} / c_t) of the cosine reference (0 for "log_val", or once the reference diverged)."""
        if self.reference is None or self.epoch > len(self.reference):
            return 0.0
        before, now = self.reference[self.epoch - 2], self.reference[self.epoch - 1]
        if not (math.isfinite(before) and math.isfinite(now) and before > 0 and now > 0):
            return 0.0
        return math.log(before / now)

    def divergence_reward(self) -> float:
        """Undo the return so far and subtract the penalty: the episode's return is -penalty."""
        return -self.episode_return - self.config.divergence_penalty

    def info(self, result: EpochResult, lr: float) -> dict[str, Any]:
        return {
            "family": self.task.family,
            "epoch": self.epoch,
            "lr": lr,
            "train_loss": _info_float(result.train_loss),
            "val_loss": _info_float(result.val_loss),
            "val_accuracy": _info_float(result.val_accuracy),
            "grad_norm": _info_float(result.stats.grad_norm_mean),
            "cut": self.cut,
            "diverged": self.diverged,
        }


def check_reset_options(options: dict[str, Any]) -> None:
    """Refuse reset options ``LRControlEnv.reset`` (and ``LRControlVecEnv.set_options``) would not honour."""
    unknown = set(options) - {"family", "task", "lr_multiplier"}
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; known: family, task, lr_multiplier")
    if "task" in options and len(options) > 1:
        raise ValueError(f"reset option 'task' fixes the whole task: {sorted(set(options) - {'task'})} would be "
                         "ignored; give it alone")
    if "task" in options and not isinstance(options["task"], TaskConfig):
        raise ValueError(f"reset option 'task' must be an envs.TaskConfig, got {options['task']!r} (a family name "
                         "goes in 'family')")
    if "family" in options and not isinstance(options["family"], str):
        raise ValueError(f"reset option 'family' must be one family's name, got {options['family']!r}")


class LRControlEnv(gym.Env):
    """Set the learning rate of a real PyTorch training run, one epoch per step.

    ## Description
    Each episode draws a task — a family from ``EnvConfig.families`` (or ``options["family"]``),
    an architecture, batch size, optimizer (SGD with momentum, Adam, AdamW), an initial LR
    log-uniform over three decades around the family's default, an epoch budget (the family's own
    range, or ``EnvConfig.epochs``) and a seed — builds it, and trains the first epoch at the initial
    LR. Each step then sets the LR for the next epoch and trains it. The environment sees only what a deployed
    ``controller.PolicyScheduler`` sees, through the same code (``controller.features``).

    ## Action Space
    ``Box(-1, 1, (1,), float32)``: the LR of every param group becomes ``lr · 2^a`` (ratios between
    groups kept), then the safety rule applies: a cut to ``cut_factor`` × lr when the validation loss
    exceeds ``blowup_ratio`` × its best, and bounds ``[min_ratio, max_ratio]`` × initial LR
    (``controller.actions``, the same rule the scheduler applies).

    ## Observation Space
    ``Box(-5, 5, (19,), float32)``, the entries named by ``controller.features.FEATURE_NAMES``:
    progress, LR relative to initial and absolute, optimizer kind, train/val losses relative to their
    first and best values and one epoch ago, accuracy, gradient-norm mean/spread/trend,
    update-to-weight ratio, cosine of successive gradients, steps per epoch. Always finite.

    ## Rewards
    ``r_t = ln(val_loss_{t-1}) - ln(val_loss_t)``: dense, and an episode's return equals
    ``ln(first val loss / final val loss)``, the log improvement over the first epoch. With
    ``EnvConfig(reward="vs_cosine")`` the same change of a cosine-annealing reference run on the same
    task and seed is subtracted, so the return is ``ln(cosine's final val loss / the policy's)``. A
    diverged episode gets a final reward that makes its return exactly ``-divergence_penalty``
    (default 3).

    ## Starting State
    The task trained for one epoch at its initial LR.

    ## Episode End
    Terminated when a loss is non-finite or the validation loss exceeds ``explode_ratio`` (10) × the
    untrained model's (divergence); when that happens in the first epoch, the first step ends the
    episode with the penalty. Truncated when the epoch budget is used up (an episode of budget E has E-1
    steps; terminated instead with ``EnvConfig(budget_is_terminal=True)``). Never raises for a bad LR, never emits NaN or inf in observations or rewards.
    A step after the episode ended raises ``RuntimeError``: call ``reset()`` (vector envs do it for you).

    ## Arguments
    ``gymnasium.make("LRControl-v0", config=EnvConfig(...))``. ``reset(seed=..., options=...)``
    accepts ``options={"family": name}`` to pick the family, ``{"task": TaskConfig}`` to run one
    fixed task, and ``{"lr_multiplier": m}`` to start at m × the family default LR.

    ``info`` holds ``family, epoch, lr, train_loss, val_loss, val_accuracy (-1 for regression),
    grad_norm, cut, diverged`` (non-finite losses reported as inf).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, render_mode: str | None = None) -> None:
        self.config = config or EnvConfig()
        if render_mode is not None:
            raise ValueError(f"LRControlEnv renders nothing; render_mode must be None, got {render_mode!r}")
        self.render_mode = render_mode
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self.device = resolve_device(self.config.device)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.observation_space = spaces.Box(-CLIP, CLIP, shape=(N_FEATURES,), dtype=np.float32)
        self.run: InnerRun | None = None
        self.episode: Episode | None = None
        self._last_obs: np.ndarray | None = None
        self._last_info: dict[str, Any] = {}
        self._ended = False
        """True once a step returned terminated or truncated: the next step needs a reset()."""

    def sample_task(self, options: dict[str, Any] | None = None) -> TaskConfig:
        """The task of the next episode, drawn from ``self.np_random`` (see ``reset``'s options)."""
        options = options or {}
        check_reset_options(options)
        if "task" in options:
            return options["task"]
        name = options.get("family")
        if name is None:
            name = self.config.families[int(self.np_random.integers(len(self.config.families)))]
        multiplier = options.get("lr_multiplier", self.config.lr_multiplier)
        return get_family(name).sample(self.np_random, lr_multiplier=multiplier, epochs=self.config.epochs)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):  # type: ignore[override]
        super().reset(seed=seed)
        task = self.sample_task(options)
        reference = None
        if self.config.reward == "vs_cosine":
            reference = run_schedule(task, "cosine", device=str(self.device)).val_losses
        self.run = TorchRun(task, self.device)
        self.episode = Episode(task, self.config, reference)
        initial_val, _ = self.run.evaluate("val")
        obs, info = self.episode.start(initial_val, self.run.run_epoch(), self.run.lr)
        self._last_obs, self._last_info, self._ended = obs, info, False
        return obs, info

    def step(self, action: np.ndarray):  # type: ignore[override]
        if self.run is None or self.episode is None:
            raise RuntimeError("call reset() before step()")
        episode = self.episode
        if self._ended:  # training on would run past the budget (progress > 1) or on from a diverged model
            why = "diverged" if episode.diverged else f"used its budget of {episode.task.epochs} epochs"
            raise RuntimeError(f"the episode ended (it {why}, and step() returned terminated or truncated): "
                               "call reset() before step()")
        if episode.diverged:  # the first epoch already diverged: nothing left to control
            assert self._last_obs is not None
            self._ended = True
            return self._last_obs.copy(), -self.config.divergence_penalty, True, False, dict(self._last_info)
        numeric = action is not None and not isinstance(action, (str, bytes))  # np.asarray reads None and "0.5"
        flat = np.asarray(action, dtype=np.float64).reshape(-1) if numeric else None
        if flat is None or flat.size != 1:
            got = f"shape {np.shape(action)}" if numeric else repr(action)
            raise ValueError(f"an action is one number a in [-1, 1] (the LR becomes lr·2^a), got {got}")
        self.run.set_lr(episode.decide(self.run.lr, float(flat[0])))
        obs, reward, terminated, truncated, info = episode.advance(self.run.run_epoch(), self.run.lr)
        self._last_obs, self._last_info, self._ended = obs, info, terminated or truncated
        return obs, reward, terminated, truncated, info

    def render(self) -> None:
        """Nothing to render (``render_mode`` is always None)."""
        return None

    def close(self) -> None:
        """Free the inner run (model, optimizer, data); ``reset()`` starts a new one."""
        self.run, self.episode = None, None

    def test_loss(self) -> tuple[float, float | None]:
        """The current model's loss and accuracy on the test split (for reporting only)."""
        if self.run is None:
            raise RuntimeError("call reset() first")
        return self.run.evaluate("test")
