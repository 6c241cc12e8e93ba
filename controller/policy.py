"""The controller policy as a plain ``nn.Module``, shaped like SB3's deterministic actor.

``PolicyNet(obs) = clip(action_net(mlp((obs - mean) / std)), -1, 1)``: the same computation as
``PPO.predict(obs, deterministic=True)`` for an ``MlpPolicy`` with a Box[-1, 1] action space, with
any observation normalisation folded in. It needs torch only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from controller.actions import ActionConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _np_relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


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
        self._numpy_cache: list[tuple[np.ndarray, np.ndarray]] | None = None

    def forward(self, obs: Tensor) -> Tensor:
        """``(..., n_features)`` observations → ``(..., 1)`` actions in [-1, 1]."""
        x = ((obs.float() - self.obs_mean) / self.obs_std).clamp(-self.obs_clip, self.obs_clip)
        return self.action_net(self.mlp(x)).clamp(-1.0, 1.0)

    def act(self, obs: Any) -> float:
        """One observation (array-like) → one action as a Python float.

        The same arithmetic as :meth:`forward`, in NumPy on views of the (CPU, float32) weights: for
        one 19-vector a dozen torch dispatches cost several times the arithmetic, and a scheduler
        decision is exactly that. Results agree with :meth:`forward` to float32 rounding.
        """
        layers = self._numpy_layers()
        if layers is None:  # weights on an accelerator or not float32: torch it is
            with torch.inference_mode():
                return float(self.forward(torch.as_tensor(obs, dtype=torch.float32))[0])
        (mean, std), *hidden, (w_out, b_out) = layers
        x = np.clip((np.asarray(obs, dtype=np.float32) - mean) / std, -self.obs_clip, self.obs_clip)
        act = np.tanh if self.activation == "tanh" else _np_relu
        for w, b in hidden:
            x = act(w @ x + b)
        return float(np.clip(w_out @ x + b_out, -1.0, 1.0)[0])

    def _numpy_layers(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """``[(mean, std), (W, b) per hidden layer, (W, b) of the output]`` as NumPy views, or None.

        Views share memory with the tensors, so in-place updates show through; ``.to()``-style moves
        and ``load_state_dict`` drop the cache (a tensor assigned by hand is not seen: call
        ``load_state_dict`` instead).
        """
        if not self._numpy_ready:
            tensors = [self.obs_mean, self.obs_std]
            for layer in [*self.mlp, self.action_net]:
                if isinstance(layer, nn.Linear):
                    tensors += [layer.weight, layer.bias]
            self._numpy_cache = None
            if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
                views = [t.detach().numpy() for t in tensors]
                self._numpy_cache = list(zip(views[0::2], views[1::2]))
            self._numpy_ready = True
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
