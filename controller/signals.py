"""Training signals an optimizer step hook can see with no user code.

:class:`StepStatsHook` registers a post-step hook on any ``torch.optim.Optimizer`` and gathers, per
optimizer step, the global gradient norm, and on sparse *probe* steps the alignment of successive
gradients and the update-to-weight norm ratio (compared whole up to :data:`PROBE_COORDS` parameters,
on a fixed sketch of that many coordinates beyond). Everything stays on the optimizer's device until
:meth:`StepStatsHook.collect` reads it once per decision (one host sync per epoch).

The reductions from raw per-step values to :class:`StepStats` live in :func:`summarize_grad_norms`
and :func:`probe_values` (which accepts batched tensors), so that a batched inner run (many models in
one computation) produces exactly the statistics this hook produces.

Why these signals: loss and gradient norm relative to their first values cannot tell an LR that is
too high from one that is too low. Successive gradients that point against each other
(``grad_cos`` < 0) mean the iterate oscillates across a valley (LR too high); consistently aligned
gradients (``grad_cos`` > 0) mean it creeps along one (LR too low). The update-to-weight ratio
(≈1e-3 per step in a healthy run) is an absolute scale that no relative feature gives.
"""

from __future__ import annotations

import array
import functools
import itertools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

NORM_SAMPLES = 16
"""Gradient norms sampled per epoch, about: every ``max(1, steps of the previous epoch // 16)``-th step, so 16–31 on
epochs of a steady length of 16 steps or more, and every step on shorter ones and in the first epoch (whose length is
not known yet)."""
PROBE_PAIRS = 4
"""Probe pairs per epoch, about: one every ``max(PROBE_MIN_EVERY, previous epoch's steps // 4)`` steps."""
PROBE_MIN_EVERY = 8
"""Probe pairs never start closer than this many steps apart."""
PROBE_COORDS = 2**16
"""Coordinates a probe pair compares, at most: models up to this many parameters are compared whole."""
PROBE_BLOCK = 256
"""Larger models are compared on ``PROBE_COORDS // PROBE_BLOCK`` evenly spaced contiguous blocks."""


def probe_coordinates(numel: int, device: torch.device | str = "cpu") -> Tensor | None:
    """The flattened-parameter coordinates a probe pair compares; ``None`` means all of them.

    A probe keeps a copy of the gradient and the weights between two steps. Up to
    :data:`PROBE_COORDS` parameters it copies them whole (exact cosine and update ratio); beyond, it
    keeps a fixed sketch: :data:`PROBE_COORDS` coordinates in contiguous blocks of
    :data:`PROBE_BLOCK`, evenly spaced over the parameter vector (so every layer is represented in
    proportion to its size). Its memory and time then stay constant however large the model, and
    the blocks read whole cache lines. The order is ``parameters_to_vector``'s (optimizer order).
    """
    if numel <= PROBE_COORDS:
        return None
    blocks = PROBE_COORDS // PROBE_BLOCK
    # Integer arithmetic: starts 0 … numel - PROBE_BLOCK, at least PROBE_BLOCK apart since numel > PROBE_COORDS.
    starts = torch.arange(blocks, dtype=torch.int64) * (numel - PROBE_BLOCK) // (blocks - 1)
    return (starts[:, None] + torch.arange(PROBE_BLOCK, dtype=torch.int64)).reshape(-1).to(device)


def sampling_intervals(previous_steps: int) -> tuple[int, int]:
    """``(norm_every, probe_every)`` for an epoch, from the previous epoch's step count (0: none yet).

    Sparse sampling keeps the hook's cost per optimizer step far below the step itself on long
    epochs; short epochs (the first, and tiny datasets) sample every step's gradient norm.
    """
    if previous_steps <= 0:
        return 1, PROBE_MIN_EVERY
    return max(1, previous_steps // NORM_SAMPLES), max(PROBE_MIN_EVERY, previous_steps // PROBE_PAIRS)


@dataclass(frozen=True)
class StepStats:
    """Per-epoch summary of optimizer-step signals. NaN marks a value that was not observed."""

    steps: int
    """Optimizer steps since the last collect."""
    grad_norm_mean: float
    """Mean global gradient L2 norm over the steps."""
    grad_norm_cv: float
    """Spread: standard deviation / mean of the per-step gradient norms (0 for a single step)."""
    grad_norm_trend: float
    """ln(mean norm over the second half of the steps / mean over the first half)."""
    update_ratio: float
    """Mean ||w_{t+1} - w_t|| / ||w_t|| over probe pairs (on :func:`probe_coordinates`)."""
    grad_cos: float
    """Mean cosine between the gradients of two successive steps over probe pairs, in [-1, 1] (on :func:`probe_coordinates`)."""

    @classmethod
    def empty(cls) -> StepStats:
        nan = math.nan
        return cls(0, nan, nan, nan, nan, nan)


def summarize_grad_norms(norms: Sequence[float]) -> tuple[float, float, float]:
    """Mean, coefficient of variation and half-to-half log trend of one run's gradient norms.

    Plain Python on a handful of floats: cheaper than a dozen tiny tensor ops at every decision. A
    batched inner run calls it once per run on its rows (``tensor.tolist()``), so both agree exactly.

    Args:
        norms: the sampled per-step gradient norms of one epoch, in step order.

    Returns:
        ``(mean, cv, trend)``: cv = population std / mean; trend =
        ``ln(mean(second half) / mean(first half))`` (0 with fewer than 2 values). NaNs when empty.
    """
    n = len(norms)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = math.fsum(norms) / n
    std = math.sqrt(math.fsum([(x - mean) ** 2 for x in norms]) / n)
    cv = std / max(mean, 1e-30)
    trend = 0.0
    if n >= 2:
        half = n // 2
        first = max(math.fsum(norms[:half]) / half, 1e-30)
        second = max(math.fsum(norms[n - half :]) / half, 1e-30)
        trend = math.log(second / first)
    return mean, cv, trend


def probe_values(
    grad_prev: Tensor, grad: Tensor, weight_prev: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradient cosine and update-to-weight ratio of one probe pair.

    Args:
        grad_prev, grad: flattened gradients of two successive steps, ``(..., n)``.
        weight_prev, weight: flattened parameters after those two steps, ``(..., n)``.

    Returns:
        ``(cos, ratio)`` of shape ``(...)``.
    """
    # vecdot reads both vectors once with no n-sized temporary; an elementwise product and a
    # (1, n) @ (n, 1) matmul both cost several times more on a CPU.
    dot = torch.linalg.vecdot(grad_prev, grad)
    cos = dot / (torch.linalg.vector_norm(grad_prev, dim=-1) * torch.linalg.vector_norm(grad, dim=-1)).clamp_min(1e-30)
    ratio = torch.linalg.vector_norm(weight - weight_prev, dim=-1) / torch.linalg.vector_norm(
        weight_prev, dim=-1
    ).clamp_min(1e-30)
    return cos, ratio


def _norm_view(grad: Tensor) -> Tensor:
    """A gradient in a form ``torch._foreach_norm`` takes, with the same L2 norm.

    Sparse gradients (``nn.Embedding(sparse=True)`` under ``SparseAdam``, ``SGD`` or ``Adagrad``) are
    not strided: a COO gradient gives its coalesced values (duplicate indices summed, no dense copy),
    any other layout its dense form.
    """
    if grad.layout == torch.strided:
        return grad
    if grad.is_sparse:
        return grad.coalesce().values()
    return grad.to_dense()


class _Samples:
    """Per-step values kept on the device in one growable buffer: a slot write per sample, one read
    per decision (cheaper than stacking dozens of scalar tensors at every decision). On the CPU the
    buffer's memory is a Python ``array`` shared with the tensor, so the read is no torch op at all."""

    def __init__(self, device: torch.device) -> None:
        self.count = 0
        self.host: array.array[float] | None = None
        self.buffer = self._allocate(64, device)

    def _allocate(self, size: int, device: torch.device) -> Tensor:
        if device.type != "cpu":
            self.host = None
            return torch.empty(size, device=device)
        self.host = array.array("f", bytes(4 * size))
        return torch.frombuffer(self.host, dtype=torch.float32)

    def add(self, value: Tensor) -> None:
        if self.count == self.buffer.numel():  # the first epoch samples every step: grow by doubling
            old = self.buffer
            self.buffer = self._allocate(2 * old.numel(), old.device)
            self.buffer[: old.numel()] = old
        if self.host is not None:  # CPU: one scalar read; a tensor slot write costs several dispatches more
            self.host[self.count] = float(value)
        else:
            self.buffer[self.count] = value
        self.count += 1

    def values(self) -> Tensor:
        return self.buffer[: self.count]

    def __getstate__(self) -> dict[str, object]:
        # a copy must share its host array with its tensor again, as a new one does
        return {"device": self.buffer.device, "values": self.values().tolist()}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["device"])  # type: ignore[misc, arg-type]
        self.reset(state["values"])  # type: ignore[arg-type]

    def reset(self, values: Sequence[float] = ()) -> None:
        self.count = 0
        for v in values:
            self.add(torch.tensor(float(v)))

    def __len__(self) -> int:
        return self.count


class _ProbePlan:
    """Where a probe pair's vectors go, for one set of parameters: a buffer kept between probes.

    ``buffer[step, 0 | 1]`` holds the gradient and the weights at the pair's first and second step,
    whole or on the :func:`probe_coordinates` sketch, in ``parameters_to_vector`` order: the values
    flattening and concatenating would give. Each parameter's part is a view made once, so filling a
    vector is one ``_foreach_copy_`` when compared whole and one ``index_select(..., out=)`` per
    parameter on the sketch: several times fewer dispatches than flattening and concatenating at
    every probe, and dispatches are most of what a probe costs.
    """

    def __init__(self, params: list[Tensor]) -> None:
        # complex parameters are compared through their real and imaginary parts (a real cosine and ratio)
        self.complex = any(p.is_complex() for p in params)
        params = [torch.view_as_real(p) if p.is_complex() else p for p in params]
        self.params = params
        sizes = [p.numel() for p in params]
        device = params[0].device
        # at least float32: in half precision a product of two gradient norms past 256 overflows (cos = inf / inf)
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        self.sketched = (index := probe_coordinates(sum(sizes), device)) is not None
        bounds = list(itertools.accumulate(sizes, initial=0))
        if index is None:
            self.buffer = torch.empty(2, 2, bounds[-1], dtype=dtype, device=device)
            self.whole = [
                [[self.buffer[step, kind, lo:hi].view(p.shape) for p, lo, hi in zip(params, bounds, bounds[1:])]
                 for kind in range(2)]
                for step in range(2)
            ]
        else:
            split = [index[(index >= lo) & (index < hi)] - lo for lo, hi in itertools.pairwise(bounds)]
            found = [(j, i.to(params[j].device)) for j, i in enumerate(split) if len(i)]  # indices go with their tensor
            ends = list(itertools.accumulate((len(i) for _, i in found), initial=0))
            self.buffer = torch.empty(2, 2, ends[-1], dtype=dtype, device=device)
            # (parameter position, its sketch coordinates, where they go) for the parameters the sketch touches
            self.sketch = [
                [[(j, i, self.buffer[step, kind, lo:hi]) for (j, i), lo, hi in zip(found, ends, ends[1:])]
                 for kind in range(2)]
                for step in range(2)
            ]
        # same dtype and device everywhere: index_select writes straight into the buffer; else copy_ converts
        # (and moves: a model split over devices keeps its probe on the first parameter's device)
        self.direct = all(p.dtype == dtype and p.device == device for p in params)
        self.vectors = [(self.buffer[step, 0], self.buffer[step, 1]) for step in range(2)]

    def fill(self, step: int, grads: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Copy the gradients and the current weights into ``buffer[step]``; returns its two vectors."""
        if self.complex:
            grads = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        for kind, tensors in enumerate((grads, self.params)):
            if not self.sketched:
                if self.direct:
                    torch._foreach_copy_(self.whole[step][kind], tensors)
                else:
                    for out, t in zip(self.whole[step][kind], tensors):
                        out.copy_(t)
            elif self.direct:
                for j, i, out in self.sketch[step][kind]:
                    torch.index_select(tensors[j].reshape(-1), 0, i, out=out)
            else:
                for j, i, out in self.sketch[step][kind]:
                    out.copy_(tensors[j].reshape(-1).index_select(0, i))
        return self.vectors[step]


_HALF = (torch.float16, torch.bfloat16)

_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[tuple[weakref.ref[StepStatsHook], RemovableHandle]]] = (
    weakref.WeakKeyDictionary()
)
"""Each optimizer's StepStatsHook registrations, so that those whose hook is gone can be removed."""


class StepStatsHook:
    """Gathers :class:`StepStats` from an optimizer through ``register_step_post_hook``.

    The hook runs after every ``optimizer.step()``, so it sees the gradients the step used (inside
    Lightning, whose closure runs forward/backward within ``step``, too). With gradient clipping on,
    it sees the clipped gradients; under an AMP ``GradScaler``, the unscaled ones (a step the scaler
    skips is no step). It samples: the gradient norm on every ``norm_every``-th step and a probe pair
    (two successive steps: gradient cosine and update-to-weight ratio) every ``probe_every`` steps,
    both from :func:`sampling_intervals` of the previous epoch's length.
    A probe keeps :data:`PROBE_COORDS` coordinates at most (:func:`probe_coordinates`), so its memory
    stays small however large the model.

    Args:
        optimizer: any ``torch.optim.Optimizer``. Every parameter of its param groups is watched on
            the steps where it has a gradient (frozen ones, and unfrozen ones once they train), groups
            added later with ``add_param_group`` included. Sparse gradients (``nn.Embedding(sparse=True)``)
            and complex parameters are read as their dense, real equivalents.

    The optimizer holds the hook weakly: keep a reference to it (a scheduler does), or it stops sampling.

    Example:
        >>> hook = StepStatsHook(optimizer)
        >>> for x, y in batches:
        ...     ...; optimizer.step()
        >>> stats = hook.collect()   # one host sync; starts the next epoch's window
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.params: list[Tensor] = []
        self._groups = 0
        self._probe: tuple[Tensor, Tensor, list[int]] | None = None  # gradient, weights, which parameters
        self._plans: dict[tuple[int, ...], _ProbePlan] = {}  # per set of parameters with gradients
        self._watch(optimizer)
        self._steps = 0
        self._previous_steps = 0
        self._norm_every, self._probe_every = sampling_intervals(0)
        device = self._device
        self._norms, self._cos, self._ratios = _Samples(device), _Samples(device), _Samples(device)
        self._optimizer = optimizer
        self._attach()

    def _attach(self) -> None:
        """Register the post-step hook. The optimizer holds only a weak reference to this object: once its owner
        (the scheduler) is gone, the hook does nothing, and the next hook attached to that optimizer removes it (a
        hook cannot remove itself: the optimizer is iterating over its hooks then)."""
        ref, after = weakref.ref(self), type(self)._after_step

        def hook(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
            owner = ref()
            if owner is not None:
                after(owner, optimizer, args, kwargs)

        # Under torch.compile (of the optimizer step, or of a train step that calls it) the hook runs eagerly, as
        # it was written to: traced, its reads into host memory on CPU would break the graph and log warnings
        self._hook_fn = torch.compiler.disable(hook)
        """What the optimizer calls after each step (the bench times it)."""
        self._handle = self._optimizer.register_step_post_hook(self._hook_fn)
        attached = []
        for other, handle in _ATTACHED.get(self._optimizer, ()):
            if other() is None:
                handle.remove()
            else:
                attached.append((other, handle))
        _ATTACHED[self._optimizer] = [*attached, (ref, self._handle)]

    def __getstate__(self) -> dict[str, object]:
        # The optimizer's own copy drops its hooks, and the probe buffers are views of its parameters: a copy
        # (deepcopy, pickle, torch.save of the whole object) watches its optimizer anew and hooks into it again.
        return {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_hook_fn", "_probe", "_plans", "params")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._watch(self._optimizer)
        self._attach()

    @property
    def device(self) -> torch.device:
        """The first watched parameter's device, where the per-step samples are kept."""
        return self._device

    def remove(self) -> None:
        """Detach the hook from the optimizer."""
        self._handle.remove()

    def _watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch every parameter of every param group (frozen ones count while they have gradients)."""
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._groups = len(optimizer.param_groups)
        # a model split over devices: its per-tensor norms meet on the first parameter's device
        self._device = self.params[0].device if self.params else torch.device("cpu")
        self._one_device = all(p.device == self._device for p in self.params)
        self._probe, self._plans = None, {}  # both index into the parameter list

    def _after_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if len(optimizer.param_groups) != self._groups:  # optimizer.add_param_group since: watch them too
            self._watch(optimizer)
        index = self._steps
        self._steps += 1
        probe_end = self._probe is not None
        probe_start = not probe_end and index % self._probe_every == 0
        if probe_end or probe_start or index % self._norm_every == 0:  # most steps stop here, at no cost
            with torch.no_grad():
                self._sample(index, probe_start, probe_end)

    def _sample(self, index: int, probe_start: bool, probe_end: bool) -> None:
        watched = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not watched:
            return
        grads: list[Tensor] = [self.params[i].grad for i in watched]  # type: ignore[misc]  # None filtered above
        sparse = any(g.layout != torch.strided for g in grads)
        if index % self._norm_every == 0:
            views = [_norm_view(g) for g in grads] if sparse else grads
            if any(g.dtype in _HALF for g in grads):  # float32 norms: a half one overflows past 65504
                norms = torch._foreach_norm(views, 2, torch.float32)
            else:
                norms = torch._foreach_norm(views)
            if not self._one_device:
                norms = tuple(n.to(self._device) for n in norms)
            self._norms.add(torch.linalg.vector_norm(torch.stack(norms)))
        if sparse and (probe_start or probe_end):  # a probe compares coordinates: read sparse gradients dense
            grads = [g.to_dense() for g in grads]
        if probe_end:
            grad_prev, weight_prev, started = self._probe  # type: ignore[misc]
            self._probe = None
            if started == watched:  # the same parameters had gradients at both steps
                grad, weight = self._probe_vectors(watched, grads, 1)
                cos, ratio = probe_values(grad_prev, grad, weight_prev, weight)
                self._cos.add(cos)
                self._ratios.add(ratio)
        elif probe_start:
            self._probe = (*self._probe_vectors(watched, grads, 0), watched)

    def _probe_vectors(self, watched: list[int], grads: list[Tensor], step: int) -> tuple[Tensor, Tensor]:
        """The probe's gradient and weight vectors at the pair's first (``step`` 0) or second step (1)."""
        plan = self._plans.get(key := tuple(watched))
        if plan is None:  # once per set of parameters with gradients (usually once)
            if len(self._plans) >= 8:  # sets that keep changing: bound the buffers kept
                self._plans.clear()
            plan = self._plans[key] = _ProbePlan([self.params[i] for i in watched])
        return plan.fill(step, grads)

    def state_dict(self) -> dict[str, object]:
        """The current window as plain numbers (a pending probe pair is dropped)."""
        return {
            "steps": self._steps,
            "previous_steps": self._previous_steps,
            "norms": self._norms.values().tolist(),
            "cos": self._cos.values().tolist(),
            "ratios": self._ratios.values().tolist(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._steps = int(state["steps"])  # type: ignore[call-overload]
        self._previous_steps = int(state["previous_steps"])  # type: ignore[call-overload]
        self._norm_every, self._probe_every = sampling_intervals(self._previous_steps)
        for samples, key in ((self._norms, "norms"), (self._cos, "cos"), (self._ratios, "ratios")):
            samples.reset(state[key])  # type: ignore[arg-type]
        self._probe = None

    def collect(self) -> StepStats:
        """Summarise the steps since the last call and start a new window."""
        steps, n, k = self._steps, len(self._norms), len(self._cos)
        samples = (self._norms, self._cos, self._ratios)
        if self._norms.host is not None:  # CPU: the buffers' memory, read as Python floats
            host = [x for s in samples for x in s.host[: s.count]]  # type: ignore[index]
        else:  # the one device → host read per decision
            host = torch.cat([s.values() for s in samples]).tolist() if n else []
        self._steps, self._probe = 0, None
        for s in samples:
            s.count = 0
        if steps:
            self._previous_steps = steps
            self._norm_every, self._probe_every = sampling_intervals(steps)
        if not n:
            return StepStats.empty()
        mean, cv, trend = summarize_grad_norms(host[:n])
        grad_cos, update_ratio = math.nan, math.nan
        if k:
            grad_cos = math.fsum(host[n : n + k]) / k
            update_ratio = math.fsum(host[n + k :]) / k
        return StepStats(steps, mean, cv, trend, update_ratio, grad_cos)
