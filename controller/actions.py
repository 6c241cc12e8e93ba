"""The one map from a policy output to the next learning rate, and the safety rule beside it.

Action map: a policy outputs ``a`` ∈ [-1, 1] once per epoch and the LR of every param group becomes

    lr ← lr · 2^(scale · a)        (scale = 1: at most ×2 or ×½ per epoch; ratios between groups kept)

Safety rule, applied after the action map by the environment during training *and* by the
scheduler at inference, so the policy learns with it rather than having it bolted on:

1. Blow-up cut: if the validation loss is more than ``blowup_ratio`` × the best seen so far (or is
   not finite), the LR becomes at most ``cut_factor`` × its current value, whatever the policy said.
2. Hold: if the validation loss is more than ``hold_ratio`` × the best seen so far, the LR may not
   rise (a policy never pushes harder on a run that is getting worse).
3. Bounds: the LR stays within ``[min_ratio, max_ratio]`` × the initial LR.

A finite blow-up (loss far above its best) hurts a user as much as a NaN; the cut stops a policy from
pushing on through one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ActionConfig:
    """Parameters of the action map and the safety rule (stored in every policy file)."""

    scale: float = 1.0
    """lr ← lr · 2^(scale · a): log2 units per unit of action."""
    max_ratio: float = 64.0
    """LR ceiling relative to the initial LR."""
    min_ratio: float = 2.0**-12
    """LR floor relative to the initial LR (the LR never reaches 0)."""
    blowup_ratio: float = 2.0
    """The cut fires when val loss > blowup_ratio × best val loss so far (or is not finite)."""
    cut_factor: float = 0.25
    """On a cut, lr ← min(policy's lr, cut_factor · current lr)."""
    hold_ratio: float = 1.25
    """While val loss > hold_ratio × best val loss so far, the LR may not increase."""

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be positive and finite, got {self.scale}")
        if not (0 < self.min_ratio <= 1 <= self.max_ratio < math.inf):
            raise ValueError(
                f"need 0 < min_ratio <= 1 <= max_ratio < inf, got {self.min_ratio}, {self.max_ratio}"
            )
        if not self.blowup_ratio > 1:
            raise ValueError(f"blowup_ratio must be > 1, got {self.blowup_ratio}")
        if not 0 < self.cut_factor < 1:
            raise ValueError(f"cut_factor must be in (0, 1), got {self.cut_factor}")
        if not 1 < self.hold_ratio <= self.blowup_ratio:
            raise ValueError(f"need 1 < hold_ratio <= blowup_ratio, got {self.hold_ratio}, {self.blowup_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "exp2", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActionConfig:
        data = dict(data)
        kind = data.pop("kind", "exp2")
        if kind != "exp2":
            raise ValueError(f"unknown action map kind {kind!r} (this version knows 'exp2')")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown action map fields: {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in data.items()})


def lr_factor(action: float, config: ActionConfig = ActionConfig()) -> float:
    """The multiplicative LR change 2^(scale · a) for an action, clipped to [-1, 1] first."""
    a = float(action)
    if math.isnan(a):
        a = 0.0
    return 2.0 ** (config.scale * min(max(a, -1.0), 1.0))


def is_blowup(val_loss: float, best_val_loss: float | None, config: ActionConfig = ActionConfig()) -> bool:
    """Whether the safety cut fires: val loss not finite, or above ``blowup_ratio`` × best."""
    if not math.isfinite(val_loss):
        return True
    return best_val_loss is not None and val_loss > config.blowup_ratio * best_val_loss


def next_lr(
    lr: float,
    initial_lr: float,
    action: float,
    *,
    val_loss: float,
    best_val_loss: float | None,
    config: ActionConfig = ActionConfig(),
) -> tuple[float, bool]:
    """Apply the action map and the safety rule.

    Args:
        lr: the current LR (of the reference param group).
        initial_lr: the LR the run started with (bounds are relative to it).
        action: the policy output, nominally in [-1, 1].
        val_loss: the validation loss just observed.
        best_val_loss: the best validation loss before this one (None at the first decision).
        config: action map and safety parameters.

    Returns:
        ``(new_lr, cut)``: the LR for the next epoch and whether the blow-up cut fired.
    """
    proposed = lr * lr_factor(action, config)
    cut = is_blowup(val_loss, best_val_loss, config)
    if cut:
        proposed = min(proposed, lr * config.cut_factor)
    elif best_val_loss is not None and val_loss > config.hold_ratio * best_val_loss:
        proposed = min(proposed, lr)
    lo, hi = initial_lr * config.min_ratio, initial_lr * config.max_ratio
    return min(max(proposed, lo), hi), cut
