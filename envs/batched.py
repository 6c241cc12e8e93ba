"""Batched inner training: N MLP runs of one family as one computation, and the SB3 vector env over it.

Meta-training cost is almost all inner epochs. :class:`BatchedMLPRun` trains N small MLPs of one
task family at once: their parameters live stacked in one ``(N, P)`` tensor, each layer is a
``torch.baddbmm`` over per-run weight slices, and every per-run quantity (loss, gradient norm,
optimizer state, LR, step count) is a row. Rows never meet: no reduction runs across runs, so a run
that blows up to NaN leaves the others bit-for-bit where they would have been.

Each run follows exactly what :class:`envs.inner.TorchRun` does with the same :class:`TaskConfig`:
the same initial parameters (the family's model factory under ``torch.manual_seed(seed)``), the
same data order (its own ``torch.Generator`` seeded ``seed + 1``, one ``randperm`` per epoch), the
same optimizer math (``make_optimizer``'s SGD with momentum / Adam / AdamW, per-run step counts and
bias correction), the same mean train loss and full-batch validation pass, and the same optimizer
hook signals (:mod:`controller.signals`: ``sampling_intervals``, ``summarize_grad_norms``,
``probe_values``). ``tests/test_batched.py`` holds the parity tests.

:class:`LRControlVecEnv` is a Stable-Baselines3 ``VecEnv`` whose slots are the runs of one or more
batches; it reuses :class:`envs.lr_env.Episode` for observations, rewards and episode ends, so an
episode in a slot is the episode :class:`envs.lr_env.LRControlEnv` would produce for the same task
and actions. :func:`make_vec_env` picks it for the families in :data:`BATCHABLE_FAMILIES` and SB3's
``DummyVecEnv`` (or ``SubprocVecEnv``) of ``LRControlEnv`` for the rest.

Example:
    >>> from envs import EnvConfig
    >>> from envs.batched import make_vec_env
    >>> venv = make_vec_env(("digits_mlp", "friedman_mlp"), n_envs=32, config=EnvConfig(), seed=0)
    >>> obs = venv.reset()                     # (32, 19)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn
from torch import Tensor, nn

from controller.features import CLIP, N_FEATURES
from controller.signals import StepStats, probe_coordinates, probe_values, sampling_intervals, summarize_grad_norms
from envs import ENV_ID
from envs.evaluation import run_schedule
from envs.inner import EVAL_CHUNK, EpochResult, InnerRun
from envs.lr_env import EnvConfig, Episode, LRControlEnv, check_reset_options, resolve_device
from envs.tasks import TRAIN_FAMILIES, TaskConfig, _data_on, get_family, make_optimizer

BATCHABLE_FAMILIES: tuple[str, ...] = (
    "digits_mlp", "friedman_mlp", "breast_cancer_mlp", "teacher_mlp",  # training families
    "mnist1d_mlp", "diabetes_mlp", "blobs_mlp",  # validation families
    "mnist_mlp", "fashion_mnist_mlp", "kmnist_mlp", "cifar10_mlp",  # local families
)
"""The train, validation and local families whose model is ``tasks.mlp`` (Flatten, then Linear/ReLU layers),
trainable by :class:`BatchedMLPRun`. CNN, recurrent and attention families stay on the per-env path: batching
them needs grouped convolutions or per-run recurrent kernels, for a smaller share of the suite."""

OptimizerImpl = Literal["auto", "fused", "stacked"]
_FusedCall = tuple[Callable[..., None], tuple[list[Tensor], ...], dict[str, Any]]
"""A fused optimizer kernel, its tensor lists and its keyword arguments."""

def is_batchable(family: str) -> bool:
    """Whether ``family`` can be trained by :class:`BatchedMLPRun` (see :data:`BATCHABLE_FAMILIES`)."""
    get_family(family)  # a ValueError for unknown names
    return family in BATCHABLE_FAMILIES


@dataclass(frozen=True)
class BatchShape:
    """What every run of one batch shares: the data, the parameter shapes and the steps per epoch."""

    family: str
    """Task family (one of :data:`BATCHABLE_FAMILIES`)."""
    width: int
    """Hidden units per layer."""
    depth: int
    """Hidden layers (0: a linear model)."""
    batch_size: int
    """Mini-batch size in samples (equal batch sizes give equal steps per epoch)."""

    @classmethod
    def of(cls, task: TaskConfig) -> BatchShape:
        """The shape of ``task``."""
        return cls(task.family, task.width, task.depth, task.batch_size)

    @classmethod
    def sample(cls, family: str, rng: np.random.Generator) -> BatchShape:
        """Width, depth and batch size drawn uniformly from the family's choices (as ``TaskFamily.sample``)."""
        fam = get_family(family)
        return cls(family, int(rng.choice(fam.widths)), int(rng.choice(fam.depths)), int(rng.choice(fam.batch_sizes)))

    def sample_task(self, rng: np.random.Generator, *, lr_multiplier: float | None = None,
                    epochs: tuple[int, int] | None = None) -> TaskConfig:
        """A task of this shape; optimizer, initial LR, epoch budget and seed drawn by ``TaskFamily.sample``."""
        task = get_family(self.family).sample(rng, lr_multiplier=lr_multiplier, epochs=epochs)
        return replace(task, width=self.width, depth=self.depth, batch_size=self.batch_size)


def _init_model(config: TaskConfig) -> nn.Module:
    """The task's freshly initialised model, exactly as ``envs.tasks.build_task`` creates it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_family(config.family).model(config.width, config.depth)


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a ``tasks.mlp`` model; a ValueError for anything else."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"not a batchable MLP: {type(model).__name__} is not an nn.Sequential")
    layers: list[nn.Linear] = []
    for i, module in enumerate(model):
        expected: tuple[type[nn.Module], ...] = (
            (nn.Flatten,) if i == 0 else (nn.Linear,) if i % 2 == 1 else (nn.ReLU,)
        )
        if not isinstance(module, expected):
            raise ValueError(f"not a batchable MLP: layer {i} is {type(module).__name__}")
        if isinstance(module, nn.Linear):
            layers.append(module)
    if not layers or not isinstance(model[-1], nn.Linear):
        raise ValueError("not a batchable MLP: it must end in an nn.Linear")
    return layers


@lru_cache(maxsize=None)
def _optimizer_defaults(name: str) -> dict[str, Any]:
    """Hyperparameters of the optimizer ``make_optimizer`` builds, read from one (so they cannot drift)."""
    defaults = dict(make_optimizer(name, [nn.Parameter(torch.zeros(1))], 1.0).defaults)  # type: ignore[arg-type]
    if name == "sgd":
        if defaults["dampening"] or defaults["nesterov"] or defaults["weight_decay"] or defaults["maximize"]:
            raise NotImplementedError(f"batched SGD supports plain momentum only, got {defaults}")
    elif defaults["amsgrad"] or defaults["maximize"]:
        raise NotImplementedError(f"batched {name} supports neither amsgrad nor maximize, got {defaults}")
    return defaults


_PROBE_CHUNK = 2**18
"""Elements per probe_values call and per evaluation activation (1 MiB of float32)."""


class _EpochSignals:
    """What :class:`controller.signals.StepStatsHook` gathers during one epoch, for every run at once.

    Each run keeps its own sampling schedule (``sampling_intervals`` of its previous epoch's step
    count: a run that just started samples densely while the others do not). Gradient norms are
    taken for every run on any step where some run samples, and masked at the end.
    """

    def __init__(self, previous_steps: Sequence[int], snapshots: tuple[Tensor, Tensor], probe_index: Tensor | None) -> None:
        intervals = [sampling_intervals(s) for s in previous_steps]
        self.norm_every = [ne for ne, _ in intervals]
        self.probe_every = [pe for _, pe in intervals]
        self._norm_divisors = sorted(set(self.norm_every))
        self.norms: list[Tensor] = []
        self.norm_steps: list[int] = []
        self.cos: list[Tensor] = []
        self.ratios: list[Tensor] = []
        self.probe_masks: list[list[bool]] = []
        self.pending = [False] * len(previous_steps)
        self._grad_prev, self._weight_prev = snapshots
        self._probe_index = probe_index  # StepStatsHook's sketch of large models (None: whole vectors)

    @torch.no_grad()
    def after_step(self, index: int, grads: Tensor, params: Tensor) -> None:
        """Record step ``index`` (0-based within the epoch); ``grads``/``params`` are ``(N, P)`` after the step."""
        if any(index % ne == 0 for ne in self._norm_divisors):
            self.norms.append(torch.linalg.vector_norm(grads, dim=1))
            self.norm_steps.append(index)
        ending = self.pending
        starting = [not e and index % pe == 0 for e, pe in zip(ending, self.probe_every)]
        if (any(ending) or any(starting)) and self._probe_index is not None:
            grads, params = grads.index_select(1, self._probe_index), params.index_select(1, self._probe_index)
        if any(ending):
            # A few rows at a time: probe_values' (rows, P) temporaries then stay small, which spares
            # the page faults of fresh multi-megabyte allocations (thousands per epoch, seen on a CPU).
            rows = max(1, _PROBE_CHUNK // grads.shape[1])
            parts = [probe_values(self._grad_prev[i : i + rows], grads[i : i + rows], self._weight_prev[i : i + rows],
                                  params[i : i + rows]) for i in range(0, grads.shape[0], rows)]
            self.cos.append(torch.cat([cos for cos, _ in parts]))
            self.ratios.append(torch.cat([ratio for _, ratio in parts]))
            self.probe_masks.append(ending)
        if any(starting):
            # Every pending probe ends at the very next step, so one snapshot buffer serves all runs.
            self._grad_prev.copy_(grads)
            self._weight_prev.copy_(params)
        self.pending = starting

    def summarize(self) -> Tensor:
        """``(5, N)`` float64: grad-norm mean, cv, trend, update ratio, grad cosine (NaN: not observed)."""
        n_runs = len(self.norm_every)
        norms = torch.stack(self.norms, dim=1)  # (N, sampled steps)
        out = torch.full((5, n_runs), math.nan, dtype=torch.float64, device=norms.device)
        for divisor in self._norm_divisors:
            rows = [i for i, ne in enumerate(self.norm_every) if ne == divisor]
            cols = [c for c, step in enumerate(self.norm_steps) if step % divisor == 0]
            rows_t = torch.tensor(rows, device=norms.device)
            # The hook's own reduction, run by run (a handful of floats each; one host read per group)
            stats = [summarize_grad_norms(row) for row in norms[rows_t][:, cols].double().tolist()]
            out[0:3, rows_t] = torch.tensor(stats, dtype=torch.float64, device=norms.device).T
        if self.cos:
            mask = torch.tensor(self.probe_masks, device=norms.device).T  # (N, probes)
            count = mask.sum(1).double()
            for k, values in ((3, self.ratios), (4, self.cos)):
                stacked = torch.stack(values, dim=1).double()
                # Runs without a probe pair get 0/0 = NaN, as the hook reports them.
                out[k] = torch.where(mask, stacked, 0.0).sum(1) / count
        return out


class BatchedMLPRun:
    """N training runs of one MLP family and shape, trained in lockstep as one computation.

    Runs share the family, width, depth and batch size (:class:`BatchShape`) and differ in
    everything else a :class:`TaskConfig` holds: seed (initialisation and data order), optimizer
    (SGD with momentum 0.9, Adam, AdamW with weight decay 0.01, mixed freely), LR and epoch budget.
    Per run, losses and optimizer-hook signals match :class:`envs.inner.TorchRun` on the same task
    (to float32 rounding). One run diverging never touches the others: it just reports NaN.

    Parameters live in one ``(N, P)`` tensor (row i = run i's ``parameters_to_vector``), gradients
    and optimizer state in tensors of the same shape, so optimizer steps, gradient norms and probe
    pairs are row-wise operations over a handful of large tensors.

    Args:
        configs: the N tasks (one :class:`BatchShape`; family in :data:`BATCHABLE_FAMILIES`).
        device: where parameters, optimizer state and data live (all N runs resident).
        optimizer_impl: ``"fused"``: one call of torch's fused SGD/Adam/AdamW kernel per run (the
            kernels ``make_optimizer`` uses; fastest on CPU). ``"stacked"``: the same update as a few
            element-wise ops over all runs' rows with per-run coefficient columns (fewest kernel
            launches; fastest on GPU). ``"auto"``: fused on CPU, stacked elsewhere.

    Example:
        >>> tasks = [replace(get_family("digits_mlp").default_task(), seed=s) for s in range(8)]
        >>> batch = BatchedMLPRun(tasks)
        >>> results = batch.run_epoch()          # 8 EpochResults, one epoch of every run
        >>> batch.set_lr(3, 2 * batch.lrs[3])    # run 3 trains its next epoch at twice the LR
    """

    def __init__(
        self, configs: Sequence[TaskConfig], device: str | torch.device = "cpu", optimizer_impl: OptimizerImpl = "auto"
    ) -> None:
        if not configs:
            raise ValueError("BatchedMLPRun needs at least one task")
        shape = BatchShape.of(configs[0])
        for c in configs:
            if BatchShape.of(c) != shape:
                raise ValueError(f"all runs of a batch need one shape: {BatchShape.of(c)} differs from {shape}")
        if not is_batchable(shape.family):
            raise ValueError(f"family {shape.family!r} is not batchable; batchable: {', '.join(BATCHABLE_FAMILIES)}")
        if optimizer_impl not in ("auto", "fused", "stacked"):
            raise ValueError(f"optimizer_impl must be 'auto', 'fused' or 'stacked', got {optimizer_impl!r}")
        self.device = torch.device(device)
        self.shape = shape
        self.family = get_family(shape.family)
        self.configs: list[TaskConfig] = list(configs)
        self.optimizer_impl = optimizer_impl
        if optimizer_impl == "auto":
            self.optimizer_impl = "fused" if self.device.type == "cpu" else "stacked"
        self.data = _data_on(shape.family, str(self.device))
        n = len(self.configs)

        models = [_init_model(c) for c in self.configs]
        self._layer_shapes = [tuple(layer.weight.shape) for layer in _linear_layers(models[0])]  # (out, in)
        self.params = torch.stack([nn.utils.parameters_to_vector(m.parameters()) for m in models]).to(self.device)
        self.params = self.params.detach().contiguous()
        self.grads = torch.zeros_like(self.params)
        self.exp_avg = torch.zeros_like(self.params)  # Adam's first moment; SGD's momentum buffer
        self.exp_avg_sq = torch.zeros_like(self.params)  # Adam's second moment (unused by SGD rows)
        self.steps = torch.zeros(n, dtype=torch.float32, device=self.device)  # per-run optimizer steps
        self._host_steps = [0] * n
        self._lrs = [float(c.lr) for c in self.configs]
        self.generators = [self._generator(c) for c in self.configs]
        self._previous_steps = [0] * n  # per-run StepStatsHook state: last epoch's step count
        self._weights: list[Tensor] = []
        self._biases: list[Tensor] = []
        self._weight_grads: list[Tensor] = []
        self._bias_grads: list[Tensor] = []
        offset = 0
        for out_f, in_f in self._layer_shapes:
            w, b = slice(offset, offset + out_f * in_f), slice(offset + out_f * in_f, offset + out_f * in_f + out_f)
            self._weights.append(self.params[:, w].view(n, out_f, in_f))
            self._weight_grads.append(self.grads[:, w].view(n, out_f, in_f))
            self._biases.append(self.params[:, b].view(n, 1, out_f))
            self._bias_grads.append(self.grads[:, b].view(n, 1, out_f))
            offset = b.stop
        self._param_rows, self._grad_rows = list(self.params.unbind(0)), list(self.grads.unbind(0))
        self._exp_avg_rows, self._exp_avg_sq_rows = list(self.exp_avg.unbind(0)), list(self.exp_avg_sq.unbind(0))
        self._step_rows = list(self.steps.unbind(0))
        self._pending: list[EpochResult | None] = [None] * n  # results not yet read through slot()
        self._probe_index = probe_coordinates(self.params.shape[1], self.device)
        probed = self.params.shape[1] if self._probe_index is None else self._probe_index.numel()
        self._snapshots = (self.params.new_empty(n, probed), self.params.new_empty(n, probed))  # probe pair starts
        self._calls: list[_FusedCall] | None = None
        self._buffers: dict[str, Tensor] = {}
        self._columns: dict[str, Tensor] | None = None

    # ---- per-run state ---------------------------------------------------------------------------

    @property
    def n_runs(self) -> int:
        return len(self.configs)

    @property
    def lrs(self) -> list[float]:
        """Every run's current LR."""
        return list(self._lrs)

    def set_lr(self, index: int, lr: float) -> None:
        """Set run ``index``'s LR for its next epochs."""
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be positive and finite, got {lr}")
        self._lrs[index] = float(lr)
        self._calls = self._columns = None

    def _generator(self, config: TaskConfig) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed + 1)
        return generator

    @torch.no_grad()
    def replace(self, indices: Sequence[int], source: BatchedMLPRun) -> None:
        """Move ``source``'s runs, with all their state, into rows ``indices`` (in place).

        This is how a finished run's slot gets a fresh task: build a small batch of the new tasks,
        train it as far as needed (e.g. its first epoch), then move it in.
        """
        if len(indices) != source.n_runs:
            raise ValueError(f"{len(indices)} indices for {source.n_runs} runs")
        if source.shape != self.shape or source.device != self.device:
            raise ValueError(f"cannot move runs of {source.shape} on {source.device} "
                             f"into {self.shape} on {self.device}")
        rows = torch.tensor(list(indices), device=self.device)
        for dst, src in ((self.params, source.params), (self.exp_avg, source.exp_avg),
                         (self.exp_avg_sq, source.exp_avg_sq), (self.steps, source.steps)):
            dst.index_copy_(0, rows, src)
        for k, i in enumerate(indices):
            self.configs[i] = source.configs[k]
            self._host_steps[i] = source._host_steps[k]
            self._lrs[i] = source._lrs[k]
            self.generators[i] = source.generators[k]
            self._previous_steps[i] = source._previous_steps[k]
            self._pending[i] = None
        self._calls = self._columns = None

    # ---- the computation -------------------------------------------------------------------------

    def _forward(self, x: Tensor, runs: slice = slice(None), *, shared_input: bool = False,
                 out: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Every layer's input, then the output ``(runs, batch, outputs)``.

        Args:
            x: per-run inputs ``(runs, batch, features)``, or with ``shared_input`` one ``(batch,
                features)`` input fed to every run (the first layer is then one matmul).
            runs: which runs (rows) to evaluate.
            out: preallocated outputs of every layer (training), else new tensors.
        """
        last = len(self._weights) - 1
        activations = [x]
        h = x
        for k, (w, b) in enumerate(zip(self._weights, self._biases)):
            w, b = w[runs], b[runs]
            if k == 0 and shared_input:
                n, out_f = w.shape[0], w.shape[1]
                h = F.linear(h, w.reshape(n * out_f, -1), b.reshape(n * out_f)).view(-1, n, out_f).transpose(0, 1)
            else:
                # bmm then add: ~15 % faster than baddbmm, which first copies b into the output.
                h = torch.bmm(h, w.mT, out=None if out is None else out[k]).add_(b)
            if k < last:
                h.relu_()
            activations.append(h)
        return activations

    def _losses(self, out: Tensor, target: Tensor) -> Tensor:
        """Per-run mean loss ``(N,)`` of outputs ``(N, batch, outputs)`` against targets ``(N, batch, ...)``."""
        if self.family.kind == "classification":
            per_sample = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="none")
            return per_sample.view(out.shape[0], -1).mean(1)
        return F.mse_loss(out, target, reduction="none").flatten(1).mean(1)

    def _workspace(self, name: str, *shape: int) -> Tensor:
        """A preallocated buffer viewed as ``shape``. The hot loop allocates nothing large: fresh
        multi-megabyte allocations page-fault (thousands of faults per epoch were seen on a CPU)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[name] = torch.empty(size, device=self.device)
        return buffer[:size].view(shape)

    def _train_step(self, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """Forward and backward on mini-batches ``x[idx]``, ``idx`` ``(N, batch)``; fills ``self.grads``.

        The backward pass is written out (an MLP's is short): each weight gradient is one batched
        matmul straight into the run's rows of ``self.grads`` — no autograd graph, no gradient
        accumulation pass. Row i only ever reads run i's values.

        Returns:
            The per-run mean losses ``(N,)``.
        """
        n, batch = idx.shape
        inputs = torch.index_select(x, 0, idx.reshape(-1), out=self._workspace("x", n * batch, x.shape[1]))
        target = y[idx]
        outs = [self._workspace(f"a{k}", n, batch, out_f) for k, (out_f, _) in enumerate(self._layer_shapes)]
        activations = self._forward(inputs.view(n, batch, -1), out=outs)
        out = activations.pop()
        if self.family.kind == "classification":
            log_p = torch.log_softmax(out, dim=-1)
            index = target.unsqueeze(-1)
            losses = -log_p.gather(-1, index).squeeze(-1).mean(1)
            minus_one = torch.full(index.shape, -1.0, device=out.device)
            grad = log_p.exp_().scatter_add_(-1, index, minus_one).div_(batch)  # (softmax - one-hot) / batch
        else:
            diff = out.sub_(target)
            losses = diff.square().flatten(1).mean(1)
            grad = diff.mul_(2.0 / diff[0].numel())
        for k in reversed(range(len(self._weights))):
            h = activations[k]
            # Into a contiguous workspace, then one copy into the runs' rows: torch's bmm writes a
            # strided ``out`` several times slower (2-6x with two threads on a CPU).
            wg = self._weight_grads[k]
            wg.copy_(torch.bmm(grad.mT, h, out=self._workspace("wg", *wg.shape)))
            torch.sum(grad, dim=1, keepdim=True, out=self._bias_grads[k])
            if k:
                back = torch.bmm(grad, self._weights[k], out=self._workspace(f"g{k % 2}", *h.shape))
                # ReLU's backward, as autograd does it: pass the gradient where the output is > 0.
                grad = torch.ops.aten.threshold_backward.grad_input(back, h, 0.0, grad_input=back)
        return losses

    @torch.no_grad()
    def _optimizer_step(self) -> None:
        self.steps += 1
        self._host_steps = [t + 1 for t in self._host_steps]
        if self.optimizer_impl == "fused":
            self._fused_step()
        else:
            self._stacked_step()

    def _fused_calls(self) -> list[_FusedCall]:
        """Per run: torch's fused kernel for its optimizer, its row's tensors and its hyperparameters.

        ``torch.optim``'s fused path calls these kernels once per optimizer; calling them once per
        run with the run's LR and step count is the same arithmetic on the run's row.
        """
        calls: list[_FusedCall] = []
        for i, config in enumerate(self.configs):
            p, g, m, v = self._param_rows[i], self._grad_rows[i], self._exp_avg_rows[i], self._exp_avg_sq_rows[i]
            hp = _optimizer_defaults(config.optimizer)
            if config.optimizer == "sgd":
                calls.append((torch._fused_sgd_, ([p], [g], [m]),
                              {"weight_decay": 0.0, "momentum": hp["momentum"], "lr": self._lrs[i], "dampening": 0.0,
                               "nesterov": False, "maximize": False}))
            else:
                kernel = torch._fused_adamw_ if config.optimizer == "adamw" else torch._fused_adam_
                beta1, beta2 = hp["betas"]
                no_amsgrad: list[Tensor] = []
                calls.append((kernel, ([p], [g], [m], [v], no_amsgrad, [self._step_rows[i]]),
                              {"amsgrad": False, "lr": self._lrs[i], "beta1": beta1, "beta2": beta2,
                               "weight_decay": hp["weight_decay"], "eps": hp["eps"], "maximize": False}))
        return calls

    def _fused_step(self) -> None:
        if self._calls is None:
            self._calls = self._fused_calls()
        for (kernel, tensors, kwargs), t in zip(self._calls, self._host_steps):
            if kernel is torch._fused_sgd_:
                kwargs["is_first_step"] = t == 1  # torch.optim.SGD's first step copies the gradient
            kernel(*tensors, **kwargs)

    def _stacked_columns(self) -> dict[str, Tensor]:
        """Per-run constants of the stacked update as ``(N, 1)`` float64 columns on the device."""
        names = ("a", "c", "d", "lr", "beta2", "c2", "eps", "adaptive")
        values: dict[str, list[float]] = {name: [] for name in names}
        for config, lr in zip(self.configs, self._lrs):
            hp = _optimizer_defaults(config.optimizer)
            if config.optimizer == "sgd":
                row = (hp["momentum"], 1.0, 1.0, lr, 0.0, 0.0, 1.0, 0.0)
            else:
                b1, b2 = hp["betas"]
                decay = 1.0 - lr * hp["weight_decay"] if config.optimizer == "adamw" else 1.0
                row = (b1, 1.0 - b1, decay, lr, b2, 1.0 - b2, hp["eps"], 1.0)
            for name, value in zip(names, row):
                values[name].append(value)
        return {name: torch.tensor(v, dtype=torch.float64, device=self.device).unsqueeze(-1)
                for name, v in values.items()}

    def _stacked_step(self) -> None:
        # One update for every row:  m ← a·m + c·g;  v ← β2·v + (1-β2)·g²;
        #   p ← d·p − k·m / denom,  denom = √v / √(1-β2^t) + ε (Adam rows) or 1 (SGD rows).
        # SGD: a = momentum, c = 1, d = 1, k = lr.   Adam: a = β1, c = 1-β1, d = 1 - lr·wd (AdamW), k = lr/(1-β1^t).
        # The constants stay on the device and the bias corrections are computed there, so a step
        # never waits for a host → device copy.
        if self._columns is None:
            self._columns = self._stacked_columns()
        col = self._columns
        kinds = {c.optimizer for c in self.configs}
        t = self.steps.double().unsqueeze(-1)
        f32 = lambda x: x.to(torch.float32)  # noqa: E731
        p, g, m, v = self.params, self.grads, self.exp_avg, self.exp_avg_sq
        m.mul_(f32(col["a"])).addcmul_(g, f32(col["c"]))
        if "adamw" in kinds:
            p.mul_(f32(col["d"]))
        if kinds == {"sgd"}:
            p.addcmul_(m, f32(col["lr"]), value=-1.0)
            return
        adaptive = col["adaptive"].bool()
        k = torch.where(adaptive, col["lr"] / (1.0 - col["a"] ** t), col["lr"])
        inv_bc2 = torch.where(adaptive, torch.rsqrt(1.0 - col["beta2"] ** t), 0.0)
        v.mul_(f32(col["beta2"])).addcmul_(g * g, f32(col["c2"]))
        denom = torch.sqrt(v).mul_(f32(inv_bc2)).add_(f32(col["eps"]))
        if "sgd" in kinds:
            denom = torch.where(adaptive, denom, 1.0)  # SGD rows divide by exactly 1 (never by a non-finite √v)
        p.addcdiv_(m * f32(k), denom, value=-1.0)

    @torch.no_grad()
    def run_epoch(self) -> list[EpochResult]:
        """Train every run one epoch at its current LR, then evaluate each on the validation split."""
        x, y = self.data.x_train.flatten(1), self.data.y_train
        n_samples, batch = x.shape[0], self.shape.batch_size
        perm = torch.stack([torch.randperm(n_samples, generator=g, device=self.device) for g in self.generators])
        total = torch.zeros(self.n_runs, device=self.device)
        signals = _EpochSignals(self._previous_steps, self._snapshots, self._probe_index)
        steps = 0
        for start in range(0, n_samples, batch):
            idx = perm[:, start : start + batch]
            losses = self._train_step(x, y, idx)
            self._optimizer_step()
            total += losses * idx.shape[1]
            signals.after_step(steps, self.grads, self.params)
            steps += 1
        self._previous_steps = [steps] * self.n_runs
        val_loss, val_acc = self._evaluate_tensors("val")
        host = torch.cat([torch.stack([total.double(), val_loss.double(), val_acc.double()]),
                          signals.summarize()]).tolist()  # the one device → host read per epoch
        train, val, acc, g_mean, g_cv, g_trend, ratio, cos = host
        classification = self.family.kind == "classification"
        return [
            EpochResult(train[i] / n_samples, val[i], acc[i] if classification else None,
                        StepStats(steps, g_mean[i], g_cv[i], g_trend[i], ratio[i], cos[i]))
            for i in range(self.n_runs)
        ]

    @torch.no_grad()
    def _evaluate_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        data = self.data
        if split == "val":
            x, y = data.x_val, data.y_val
        elif split == "test":
            x, y = data.x_test, data.y_test
        else:
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        x = x.flatten(1)
        n = self.n_runs
        loss_sum = torch.zeros(n, device=x.device)
        correct = torch.zeros(n, device=x.device)
        # A few runs at a time: activations then stay around 1 MiB instead of N times that (fresh
        # multi-megabyte allocations cost page faults on a CPU); per run, the arithmetic is the same.
        widest = max(max(shape) for shape in self._layer_shapes)
        runs_per_chunk = max(1, _PROBE_CHUNK // (min(x.shape[0], EVAL_CHUNK) * widest)) if x.device.type == "cpu" else n
        for start in range(0, x.shape[0], EVAL_CHUNK):
            xb, yb = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
            for lo in range(0, n, runs_per_chunk):
                runs = slice(lo, min(lo + runs_per_chunk, n))
                out = self._forward(xb, runs, shared_input=True)[-1]
                loss_sum[runs] += self._losses(out, yb.expand(out.shape[0], *yb.shape)) * xb.shape[0]
                if self.family.kind == "classification":
                    correct[runs] += (out.argmax(-1) == yb).sum(1)
        return loss_sum / x.shape[0], correct / x.shape[0]

    def evaluate(self, split: str = "val") -> list[tuple[float, float | None]]:
        """Every run's ``(loss, accuracy or None)`` on ``"val"`` or ``"test"``."""
        loss, acc = (t.tolist() for t in self._evaluate_tensors(split))
        classification = self.family.kind == "classification"
        return [(loss[i], acc[i] if classification else None) for i in range(self.n_runs)]

    # ---- one run behind the InnerRun interface ---------------------------------------------------

    def slot(self, index: int) -> InnerRun:
        """Run ``index`` as an :class:`envs.inner.InnerRun` (see :class:`BatchSlot`)."""
        return BatchSlot(self, index)

    def _slot_result(self, index: int) -> EpochResult:
        if self._pending[index] is None:
            unread = [i for i, r in enumerate(self._pending) if r is not None]
            if unread:
                raise RuntimeError(f"runs {unread} have not read their previous epoch; the batch trains in lockstep")
            self._pending = list(self.run_epoch())
        result = self._pending[index]
        self._pending[index] = None
        assert result is not None
        return result


class BatchSlot(InnerRun):
    """One run of a :class:`BatchedMLPRun`, behind the interface ``LRControlEnv`` talks to.

    The batch trains in lockstep: the first slot whose ``run_epoch`` is called trains every run one
    epoch, and the other slots' calls return their share. So every slot sets its LR, then every
    slot calls ``run_epoch`` once; setting an LR between the two raises.
    """

    def __init__(self, batch: BatchedMLPRun, index: int) -> None:
        self.batch, self.index = batch, index

    @property
    def config(self) -> TaskConfig:  # type: ignore[override]
        return self.batch.configs[self.index]

    @property
    def lr(self) -> float:
        return self.batch.lrs[self.index]

    def set_lr(self, lr: float) -> None:
        if self.batch._pending[self.index] is not None:
            raise RuntimeError("this run's epoch was already trained with the batch; read it with run_epoch() first")
        self.batch.set_lr(self.index, lr)

    def run_epoch(self) -> EpochResult:
        return self.batch._slot_result(self.index)

    def evaluate(self, split: str = "val") -> tuple[float, float | None]:
        return self.batch.evaluate(split)[self.index]


# --------------------------------------------------------------------------------------------------
# The vector environment
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchConfig:
    """How :class:`LRControlVecEnv` groups its slots into batched inner runs."""

    runs_per_batch: int | None = None
    """Slots per batch (the last batch takes the remainder); None: all slots in one batch. Smaller
    batches train more families and shapes at once, at a lower speed-up per batch."""
    reshape_every: int | None = 200
    """Epochs after which a batch draws a new family and shape. Its running episodes are then
    truncated (``TimeLimit.truncated``, bootstrapped by SB3): about (mean episode length) / this of
    all episodes end early. None: a batch keeps its first shape for good."""
    optimizer_impl: OptimizerImpl = "auto"
    """:class:`BatchedMLPRun`'s optimizer implementation."""

    def __post_init__(self) -> None:
        if self.runs_per_batch is not None and self.runs_per_batch < 1:
            raise ValueError(f"runs_per_batch must be >= 1 or None, got {self.runs_per_batch}")
        if self.reshape_every is not None and self.reshape_every < 1:
            raise ValueError(f"reshape_every must be >= 1 or None, got {self.reshape_every}")
        if self.optimizer_impl not in ("auto", "fused", "stacked"):
            raise ValueError(f"optimizer_impl must be 'auto', 'fused' or 'stacked', got {self.optimizer_impl!r}")


@dataclass
class _Group:
    """One batch of slots: which slots, their batched run, and when it draws a new shape."""

    slots: list[int]
    run: BatchedMLPRun | None = None
    epochs_left: int | None = None
    """Epochs until the next reshape (None: never)."""


class LRControlVecEnv(VecEnv):
    """``LRControl-v0`` for N slots at once, their inner runs trained as batched computations.

    ## Description
    Each slot is an ``LRControlEnv`` episode — a task, its first epoch trained at the initial LR,
    then one epoch per step at the LR the agent sets — and observations, rewards and episode ends
    come from the same :class:`envs.lr_env.Episode` code. The slots are split into batches
    (``BatchConfig.runs_per_batch``); the runs of a batch share a :class:`BatchShape` and are trained
    by one :class:`BatchedMLPRun`, so one ``step`` costs one batched epoch per batch.

    ## How a batch's tasks are drawn
    A batch draws its shape: a family uniformly from ``EnvConfig.families`` (all must be in
    :data:`BATCHABLE_FAMILIES`), then width, depth and batch size uniformly from that family's
    choices. Each slot then draws its own task of that shape with ``TaskFamily.sample`` — optimizer,
    initial LR (log-uniform over three decades, or ``EnvConfig.lr_multiplier``), epoch budget and
    seed — so per episode these are distributed exactly as in ``LRControlEnv``; only the shape is
    shared within a batch. When a slot's episode ends, the slot gets a new task of the batch's shape
    (its first epoch is trained at once, in a small batch of the slots resetting on that step), so
    the batch keeps advancing in lockstep. Every ``BatchConfig.reshape_every`` epochs the batch draws
    a new shape and truncates its running episodes.

    ## Action Space / Observation Space / Rewards
    As ``LRControlEnv``, per slot: ``Box(-1, 1, (1,))`` actions, ``Box(-5, 5, (19,))`` observations,
    rewards ``ln(val_{t-1} / val_t)`` and ``-divergence_penalty`` in total for a diverged episode.

    ## Episode End
    As ``LRControlEnv`` (divergence terminates, a used-up budget truncates), plus truncation at a
    reshape. SB3 auto-reset: on ``dones[i]``, ``infos[i]["terminal_observation"]`` is the episode's
    last observation, ``infos[i]["TimeLimit.truncated"]`` is ``truncated and not terminated`` and
    the returned observation is the first of the slot's next episode (its info in ``reset_infos``).

    ## Arguments
    ``LRControlVecEnv(n_envs, config=EnvConfig(families=...), batch_config=BatchConfig())``; the
    default config draws from the batchable training families.
    ``seed(s)`` then ``reset()`` is reproducible. ``set_options`` takes per-slot reset options as
    ``LRControlEnv.reset`` does (``family``, ``task``, ``lr_multiplier``); the slots of one batch must
    agree on the family, and their ``task`` options on the shape. ``get_attr("episode")`` reads the
    slots' episodes (``.task``: the slot's TaskConfig) and ``env_method("test_loss")`` evaluates them
    on the test split, as for ``LRControlEnv``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        n_envs: int,
        config: EnvConfig | None = None,
        batch_config: BatchConfig | None = None,
        render_mode: str | None = None,
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        if render_mode is not None:
            raise ValueError(f"LRControlVecEnv renders nothing; render_mode must be None, got {render_mode!r}")
        # Like LRControlEnv, train on training families only unless told otherwise.
        self.config = config or EnvConfig(families=tuple(f for f in TRAIN_FAMILIES if f in BATCHABLE_FAMILIES))
        self.batch_config = batch_config or BatchConfig()
        unbatchable = [f for f in self.config.families if not is_batchable(f)]
        if unbatchable:
            raise ValueError(f"families {unbatchable} are not batchable (batchable: {', '.join(BATCHABLE_FAMILIES)}); "
                             "use envs.batched.make_vec_env to mix them in through per-env LRControlEnvs")
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self.device = resolve_device(self.config.device)
        size = self.batch_config.runs_per_batch or n_envs
        self._groups = [_Group(list(range(s, min(s + size, n_envs)))) for s in range(0, n_envs, size)]
        self._group_of = [g for g, group in enumerate(self._groups) for _ in group.slots]
        self._row_of = [r for group in self._groups for r in range(len(group.slots))]
        self._episodes: list[Episode | None] = [None] * n_envs
        self._last_obs = np.zeros((n_envs, N_FEATURES), dtype=np.float32)
        self._last_infos: list[dict[str, Any]] = [{} for _ in range(n_envs)]
        self._actions: np.ndarray | None = None
        self._rng = np.random.default_rng()
        super().__init__(
            n_envs,
            spaces.Box(-CLIP, CLIP, shape=(N_FEATURES,), dtype=np.float32),
            spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32),
        )

    # ---- drawing tasks ---------------------------------------------------------------------------

    def _group_tasks(self, group: _Group, options: Sequence[dict[str, Any]]) -> list[TaskConfig]:
        """A new shape for ``group`` and a task per slot (reset options honoured)."""
        for opts in options:
            check_reset_options(opts)
        fixed = [o["task"] for o in options if "task" in o]
        families = {o["family"] for o in options if "family" in o} | {t.family for t in fixed}
        if len(families) > 1:
            raise ValueError(f"the slots of one batch must share a family, got {sorted(families)}")
        if len({BatchShape.of(t) for t in fixed}) > 1:
            raise ValueError("the 'task' options of one batch's slots must share family, width, depth and batch size")
        if fixed:
            shape = BatchShape.of(fixed[0])
        else:
            family = families.pop() if families else self._choice(self.config.families)
            shape = BatchShape.sample(family, self._rng)
        if not is_batchable(shape.family):
            raise ValueError(f"family {shape.family!r} is not batchable")
        return [self._slot_task(shape, opts) for opts in options]

    def _slot_task(self, shape: BatchShape, options: dict[str, Any]) -> TaskConfig:
        if "task" in options:
            return options["task"]
        return shape.sample_task(self._rng, lr_multiplier=options.get("lr_multiplier", self.config.lr_multiplier),
                                 epochs=self.config.epochs)

    def _choice(self, names: Sequence[str]) -> str:
        return names[int(self._rng.integers(len(names)))]

    def _start(self, slots: Sequence[int], tasks: Sequence[TaskConfig]) -> BatchedMLPRun:
        """Build the tasks' runs, train their first epoch and start the slots' episodes."""
        run = BatchedMLPRun(tasks, self.device, self.batch_config.optimizer_impl)
        initial = run.evaluate("val")
        results = run.run_epoch()
        for k, (slot, task) in enumerate(zip(slots, tasks)):
            reference = None
            if self.config.reward == "vs_cosine":  # LRControlEnv's reference run, one per episode
                reference = run_schedule(task, "cosine", device=str(self.device)).val_losses
            episode = Episode(task, self.config, reference)
            obs, info = episode.start(initial[k][0], results[k], run.lrs[k])
            self._episodes[slot] = episode
            self._last_obs[slot], self._last_infos[slot] = obs, info
            self.reset_infos[slot] = dict(info)
        return run

    def _reshape(self, group: _Group, options: Sequence[dict[str, Any]]) -> None:
        group.run = self._start(group.slots, self._group_tasks(group, options))
        if self.batch_config.reshape_every is not None:
            group.epochs_left = self.batch_config.reshape_every

    # ---- VecEnv API ------------------------------------------------------------------------------

    def reset(self) -> np.ndarray:
        seeds = [s for s in self._seeds if s is not None]
        if seeds:
            self._rng = np.random.default_rng(seeds)
        for g, group in enumerate(self._groups):
            self._reshape(group, [self._options[s] for s in group.slots])
            if group.epochs_left is not None:
                # Stagger the batches' reshapes so that they do not all truncate on one step.
                group.epochs_left -= g * group.epochs_left // len(self._groups)
        self._reset_seeds()
        self._reset_options()
        return self._last_obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.size != self.num_envs:
            raise ValueError(f"expected one action a in [-1, 1] per slot ({self.num_envs}), got shape {actions.shape}")
        self._actions = actions.reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("call step_async() before step_wait()")
        if any(group.run is None for group in self._groups):
            raise RuntimeError("call reset() before step()")
        actions, self._actions = self._actions, None
        obs = self._last_obs.copy()
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=bool)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        penalty = self.config.divergence_penalty
        for group in self._groups:
            run = group.run
            assert run is not None
            terminated = dict.fromkeys(group.slots, False)
            truncated = dict.fromkeys(group.slots, False)
            first_epoch_diverged = []
            for row, slot in enumerate(group.slots):
                episode = self._episodes[slot]
                assert episode is not None
                if episode.diverged:  # diverged in its first epoch: as LRControlEnv.step, end it now
                    first_epoch_diverged.append(slot)
                    rewards[slot], terminated[slot], infos[slot] = -penalty, True, dict(self._last_infos[slot])
                else:
                    run.set_lr(row, episode.decide(run.lrs[row], float(actions[slot])))
            results = run.run_epoch()
            for row, slot in enumerate(group.slots):
                if slot in first_epoch_diverged:
                    continue
                episode = self._episodes[slot]
                assert episode is not None
                obs[slot], rewards[slot], terminated[slot], truncated[slot], infos[slot] = episode.advance(
                    results[row], run.lrs[row])
                self._last_obs[slot], self._last_infos[slot] = obs[slot], infos[slot]
            if group.epochs_left is not None:
                group.epochs_left -= 1
            reshape = group.epochs_left is not None and group.epochs_left <= 0
            if reshape:
                truncated = dict.fromkeys(group.slots, True)
            done_rows, done_slots = [], []
            for row, slot in enumerate(group.slots):
                dones[slot] = terminated[slot] or truncated[slot]
                infos[slot]["TimeLimit.truncated"] = truncated[slot] and not terminated[slot]
                if dones[slot]:
                    infos[slot]["terminal_observation"] = obs[slot].copy()
                    done_rows.append(row)
                    done_slots.append(slot)
            if reshape:
                self._reshape(group, [{} for _ in group.slots])
            elif done_slots:
                shape = run.shape
                nursery = self._start(done_slots, [self._slot_task(shape, {}) for _ in done_slots])
                run.replace(done_rows, nursery)
            for slot in done_slots:
                obs[slot] = self._last_obs[slot]
        return obs, rewards, dones, infos

    def close(self) -> None:
        for group in self._groups:
            group.run = None

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Per slot: ``episode`` (its :class:`Episode`, as ``LRControlEnv.episode``), ``spec`` (the
        ``LRControl-v0`` spec with this env's config, as ``gym.make`` gives); else this env's attribute."""
        slots = list(self._get_indices(indices))
        if attr_name == "episode":
            return [self._episodes[s] for s in slots]
        if attr_name == "render_mode":
            return [None for _ in slots]
        if attr_name == "spec":
            spec = replace(gym.spec(ENV_ID), kwargs={"config": self.config})
            return [spec for _ in slots]
        return [getattr(self, attr_name) for _ in slots]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Slots share this env's attributes: only all of them at once can be set."""
        if sorted(self._get_indices(indices)) != list(range(self.num_envs)):
            raise ValueError("the slots of LRControlVecEnv share its attributes; set them for all slots at once")
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """``test_loss``: each slot's ``(loss, accuracy or None)`` on the test split, as ``LRControlEnv.test_loss``."""
        slots = list(self._get_indices(indices))
        if method_name != "test_loss":
            raise AttributeError(f"LRControlVecEnv slots have no method {method_name!r} (only 'test_loss')")
        by_group: dict[int, list[tuple[float, float | None]]] = {}
        for s in slots:
            g = self._group_of[s]
            run = self._groups[g].run
            if run is None:
                raise RuntimeError("call reset() first")
            if g not in by_group:
                by_group[g] = run.evaluate("test")
        return [by_group[self._group_of[s]][self._row_of[s]] for s in slots]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


# --------------------------------------------------------------------------------------------------
# Choosing the vector env
# --------------------------------------------------------------------------------------------------


class ConcatVecEnv(VecEnv):
    """Several VecEnvs with the same spaces side by side as one (slots numbered in order)."""

    def __init__(self, venvs: Sequence[VecEnv]) -> None:
        if not venvs:
            raise ValueError("ConcatVecEnv needs at least one VecEnv")
        first = venvs[0]
        for venv in venvs[1:]:
            if venv.observation_space != first.observation_space or venv.action_space != first.action_space:
                raise ValueError("ConcatVecEnv needs equal observation and action spaces")
        self.venvs = list(venvs)
        self._bounds = np.cumsum([0] + [v.num_envs for v in self.venvs]).tolist()
        super().__init__(self._bounds[-1], first.observation_space, first.action_space)

    def _split(self, indices: VecEnvIndices) -> list[tuple[VecEnv, list[int]]]:
        wanted = list(self._get_indices(indices))
        out = []
        for venv, lo, hi in zip(self.venvs, self._bounds[:-1], self._bounds[1:]):
            local = [i - lo for i in wanted if lo <= i < hi]
            if local:
                out.append((venv, local))
        return out

    def _order(self, indices: VecEnvIndices, parts: list[list[Any]]) -> list[Any]:
        # Answers come back grouped by child; put them back in the order the indices asked.
        by_slot: dict[int, Any] = {}
        for (venv, local), answers in zip(self._split(indices), parts):
            lo = self._bounds[self.venvs.index(venv)]
            by_slot.update({lo + i: a for i, a in zip(local, answers)})
        return [by_slot[i] for i in self._get_indices(indices)]

    def reset(self) -> np.ndarray:
        for venv, lo, hi in zip(self.venvs, self._bounds[:-1], self._bounds[1:]):
            if any(s is not None for s in self._seeds[lo:hi]):
                venv.seed(self._seeds[lo])  # child slot i gets seed + lo + i, as if it were one env
            if any(self._options[lo:hi]):
                venv.set_options(self._options[lo:hi])
        obs = np.concatenate([venv.reset() for venv in self.venvs])
        self.reset_infos = [info for venv in self.venvs for info in venv.reset_infos]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        for venv, lo, hi in zip(self.venvs, self._bounds[:-1], self._bounds[1:]):
            venv.step_async(actions[lo:hi])

    def step_wait(self) -> VecEnvStepReturn:
        parts = [venv.step_wait() for venv in self.venvs]
        self.reset_infos = [info for venv in self.venvs for info in venv.reset_infos]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), [info for p in parts for info in p[3]])

    def close(self) -> None:
        for venv in self.venvs:
            venv.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._order(indices, [v.get_attr(attr_name, local) for v, local in self._split(indices)])

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for venv, local in self._split(indices):
            venv.set_attr(attr_name, value, local)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        return self._order(indices, [v.env_method(method_name, *method_args, indices=local, **method_kwargs)
                                     for v, local in self._split(indices)])

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._order(indices, [v.env_is_wrapped(wrapper_class, local) for v, local in self._split(indices)])


def make_vec_env(
    families: Sequence[str],
    n_envs: int,
    config: EnvConfig | None = None,
    seed: int | None = None,
    *,
    batch_config: BatchConfig | None = None,
    vec_env_cls: Callable[[list[Callable[[], gym.Env]]], VecEnv] = DummyVecEnv,
    monitor: bool = True,
) -> VecEnv:
    """The vector env for training on ``families``: batched where it can be, per-env for the rest.

    - All families batchable: one :class:`LRControlVecEnv` of ``n_envs`` slots.
    - None batchable (or ``n_envs == 1``): ``vec_env_cls`` (SB3 ``DummyVecEnv`` by default, or
      ``SubprocVecEnv``) over ``n_envs`` ``LRControlEnv``, each drawing from all ``families``.
    - Both kinds: the slots are shared in proportion to the number of families of each kind (at
      least one each), an :class:`LRControlVecEnv` for the batchable ones beside per-env
      ``LRControlEnv`` for the rest, in one :class:`ConcatVecEnv`. Each slot draws its family
      uniformly from its side, so episodes come from all families at about equal rates.

    Args:
        families: task families to train on (``config.families`` is replaced by these).
        n_envs: parallel environments (slots).
        config: everything else about episodes (default ``EnvConfig()``).
        seed: passed to ``VecEnv.seed`` (used at the first ``reset``); None: not seeded.
        batch_config: how batches are formed (default ``BatchConfig()``).
        vec_env_cls: the VecEnv class for the per-env side.
        monitor: wrap the result in SB3's ``VecMonitor`` (episode returns and lengths in ``info``).

    Returns:
        A VecEnv of ``n_envs`` slots, not yet reset.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    families = (families,) if isinstance(families, str) else tuple(families)  # one name, not its letters
    if not families:
        raise ValueError("families is empty")
    config = config or EnvConfig()
    batchable = tuple(f for f in families if is_batchable(f))
    rest = tuple(f for f in families if f not in batchable)

    def per_env(names: tuple[str, ...], count: int) -> VecEnv:
        return vec_env_cls([partial(LRControlEnv, replace(config, families=names)) for _ in range(count)])

    venv: VecEnv
    if batchable and not rest:
        venv = LRControlVecEnv(n_envs, replace(config, families=batchable), batch_config)
    elif not batchable or n_envs == 1:
        venv = per_env(families, n_envs)
    else:
        n_batched = min(max(round(n_envs * len(batchable) / len(families)), 1), n_envs - 1)
        venv = ConcatVecEnv([LRControlVecEnv(n_batched, replace(config, families=batchable), batch_config),
                             per_env(rest, n_envs - n_batched)])
    if seed is not None:
        venv.seed(seed)
    return VecMonitor(venv) if monitor else venv
