"""The controller policy as a plain ``nn.Module``, shaped like SB3's deterministic actor.

``PolicyNet(obs) = clip(action_net(mlp((obs - mean) / std)), -1, 1)``: the same computation as
``PPO.predict(obs, deterministic=True)`` for an ``MlpPolicy`` with a Box[-1, 1] action space, with
any observation normalisation folded in. It needs torch only.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from controller.actions import ActionConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _positive_int(value: Any) -> bool:
    """An int (or an integer type such as numpy's) >= 1; not a bool, not a float."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= 1
    except TypeError:
        return False


class PolicyNet(nn.Module):
    """Observation vector(s) → action(s) in [-1, 1].

    Args:
        n_features: observation length.
        hidden: hidden layer widths (SB3's ``net_arch["pi"]``).
        activation: ``"tanh"`` (SB3's PPO default) or ``"relu"``.
        obs_mean, obs_std: observation normalisation (identity when None).
        obs_clip: normalised observations are clipped to ±obs_clip (SB3 VecNormalize's clip_obs).

    Example:
        >>> net = PolicyNet(19, hidden=(64, 64))
        >>> net(torch.zeros(19)).shape
        torch.Size([1])
    """

    obs_mean: Tensor
    obs_std: Tensor

    def __init__(
        self,
        n_features: int,
        hidden: tuple[int, ...] | list[int] = (64, 64),
        activation: str = "tanh",
        obs_mean: Tensor | None = None,
        obs_std: Tensor | None = None,
        obs_clip: float = 10.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not _positive_int(n_features):
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        if not all(_positive_int(h) for h in hidden):
            raise ValueError(f"hidden layer widths must be positive ints, got {list(hidden)!r}")
        if not (isinstance(obs_clip, (int, float)) and 0 < obs_clip < math.inf):
            raise ValueError(f"obs_clip must be a positive finite number, got {obs_clip!r}")
        self.n_features = int(n_features)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.obs_clip = float(obs_clip)
        layers: list[nn.Module] = []
        width = self.n_features
        for h in self.hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.action_net = nn.Linear(width, 1)
        mean = torch.zeros(self.n_features) if obs_mean is None else obs_mean.detach().float().reshape(-1)
        std = torch.ones(self.n_features) if obs_std is None else obs_std.detach().float().reshape(-1)
        self.register_buffer("obs_mean", mean.clone())
        self.register_buffer("obs_std", std.clone())
        self.action_config = ActionConfig()
        """The action map and safety rule the policy was trained with (set by ``load_policy``)."""
        self.metadata: dict[str, Any] = {}
        """The policy file's metadata (set by ``load_policy``)."""
        self._numpy_ready = False
        self._numpy_tensors: list[Tensor] = []
        self._numpy_version: list[int] | None = None
        self._numpy_cache: tuple[Any, ...] | None = None

    def forward(self, obs: Tensor) -> Tensor:
        """``(..., n_features)`` observations → ``(..., 1)`` actions in [-1, 1]."""
        x = ((obs.float() - self.obs_mean) / self.obs_std).clamp(-self.obs_clip, self.obs_clip)
        return self.action_net(self.mlp(x)).clamp(-1.0, 1.0)

    def act(self, obs: Any) -> float:
        """One observation (array-like) → one action as a Python float.

        The same computation as :meth:`forward`, in NumPy on float32 CPU weights prepared once
        (:meth:`_numpy_program`): for one 19-vector, a dozen torch dispatches cost several times the
        arithmetic, and a scheduler decision is exactly that. Results agree with :meth:`forward` to
        float32 rounding.
        """
        program = self._numpy_program()
        if program is None:  # weights on an accelerator or not float32: torch it is
            with torch.inference_mode():
                return float(self.forward(torch.as_tensor(obs, dtype=torch.float32, device=self.obs_mean.device))[0])
        lo, hi, x, layers, (w_out, b_out) = program
        # the clip as two ufuncs: np.clip's Python layer costs more
        np.minimum(np.maximum(np.asarray(obs, dtype=np.float32), lo, out=x), hi, out=x)
        for w, b, h in layers:
            np.dot(w, x, out=h)
            np.add(h, b, out=h)
            if self.activation == "tanh":
                np.tanh(h, out=h)
            else:
                np.maximum(h, 0.0, out=h)
            x = h
        action = float(np.dot(w_out, x) + b_out)  # float32, like forward()'s output
        return min(max(action, -1.0), 1.0)

    def _numpy_program(self) -> tuple[Any, ...] | None:
        """What :meth:`act` runs, or None when the weights are not float32 on the CPU.

        ``(lo, hi, x, [(W, b, h) per hidden layer], (w_out, b_out))``: the normalisation is folded
        into the first layer (``W / std``, ``b - W @ (mean / std)``) and its clip becomes bounds on
        the raw observation (``mean ± obs_clip · std``); ``x`` and each ``h`` are preallocated
        outputs. Rebuilt when a weight changes: ``.to()``-style moves and ``load_state_dict`` drop it,
        and an in-place update shows in the tensors' version counters.
        """
        if not self._numpy_ready:
            tensors = [self.obs_mean, self.obs_std]
            for layer in [*self.mlp, self.action_net]:
                if isinstance(layer, nn.Linear):
                    tensors += [layer.weight, layer.bias]
            on_cpu = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            self._numpy_tensors = tensors if on_cpu else []
            self._numpy_version = None
            self._numpy_cache = None
            self._numpy_ready = True
        tensors = self._numpy_tensors
        if not tensors:
            return None
        version = [t._version for t in tensors]
        if version != self._numpy_version:
            with torch.no_grad():
                mean, std, *weights = (t.detach().double().numpy() for t in tensors)
            f32 = np.float32
            layers = []
            for k in range(0, len(weights) - 2, 2):
                w, b = weights[k], weights[k + 1]
                if k == 0:
                    w, b = w / std, b - w @ (mean / std)
                layers.append((w.astype(f32), b.astype(f32), np.empty(w.shape[0], f32)))
            w_out, b_out = weights[-2], weights[-1]
            if not layers:  # no hidden layer: the output layer takes the normalised observation
                w_out, b_out = w_out / std, b_out - w_out @ (mean / std)
            bounds = (mean - self.obs_clip * std, mean + self.obs_clip * std)
            lo, hi = np.minimum(*bounds).astype(f32), np.maximum(*bounds).astype(f32)
            self._numpy_cache = (lo, hi, np.empty(self.n_features, f32), layers, (w_out[0].astype(f32), f32(b_out[0])))
            self._numpy_version = version
        return self._numpy_cache

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> PolicyNet:
        self._numpy_ready = False
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._numpy_ready = False
        return super().load_state_dict(*args, **kwargs)

    def shape_dict(self) -> dict[str, Any]:
        """The architecture, as stored in the policy file's metadata."""
        return {
            "n_features": self.n_features,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "obs_clip": self.obs_clip,
        }
