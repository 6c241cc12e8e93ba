"""Stable-Baselines3 PPO policy → the pickle-free policy file that ``controller`` loads.

The exported network is SB3's deterministic actor: ``mlp_extractor.policy_net`` then ``action_net``,
clipped to the Box[-1, 1] action bounds — exactly ``PPO.predict(obs, deterministic=True)``.

Reading an SB3 ``.zip`` here never unpickles anything: the weights come from its ``policy.pth``
through ``torch.load(..., weights_only=True)`` and the activation from the plain-text fields of its
JSON ``data`` entry. (``PPO.load`` would run the cloudpickled objects a zip carries.)
"""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from controller.features import N_FEATURES
from controller.policy import ACTIVATIONS, PolicyNet

_ACTIVATION_NAMES = {cls.__name__: name for name, cls in ACTIVATIONS.items()}


def policy_from_state_dict(state: dict[str, torch.Tensor], activation: str) -> PolicyNet:
    """Build a :class:`PolicyNet` from an SB3 ``ActorCriticPolicy`` state dict.

    Raises:
        ValueError: the weights are not an actor-critic policy's for these features (names, shapes, a dtype
            that is not floating point), or some are not finite (a checkpoint of a run that blew up).
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not an SB3 actor-critic policy: its weights are not a dict of tensors")
    not_real = sorted(f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point())
    if not_real:  # they would be cast to float32: truncated ints, bools, complex numbers less their imaginary part
        raise ValueError(f"not an SB3 actor-critic policy: its weights must be real floating-point tensors, got "
                         f"{', '.join(not_real)}")
    try:
        net = _policy_net(state, activation)
    except (KeyError, RuntimeError) as err:  # a missing bias, a layer whose shape does not chain
        raise ValueError(f"not an SB3 actor-critic policy for these features: {err}") from None
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise ValueError("the policy's weights are not all finite (a checkpoint of a run that diverged?)")
    return net


def _policy_net(state: dict[str, torch.Tensor], activation: str) -> PolicyNet:
    layers = sorted(
        {int(m.group(1)) for k in state if (m := re.fullmatch(r"mlp_extractor\.policy_net\.(\d+)\.weight", k))}
    )
    if "action_net.weight" not in state:
        raise ValueError("not an SB3 actor-critic policy: no 'action_net.weight' in its weights")
    for name in [*(f"mlp_extractor.policy_net.{i}" for i in layers), "action_net"]:
        for key, dims, kind in ((f"{name}.weight", 2, "a matrix"), (f"{name}.bias", 1, "a vector")):
            if key in state and state[key].dim() != dims:  # a missing bias is named below (KeyError)
                shape = tuple(state[key].shape)
                raise ValueError(f"not an SB3 actor-critic policy: {key} has shape {shape}, not {kind}")
    hidden = [int(state[f"mlp_extractor.policy_net.{i}.weight"].shape[0]) for i in layers]
    n_in = int(state[f"mlp_extractor.policy_net.{layers[0]}.weight"].shape[1]) if layers else int(
        state["action_net.weight"].shape[1])
    if n_in != N_FEATURES:
        raise ValueError(f"the policy takes {n_in} observations; this library's features have {N_FEATURES}")
    if tuple(state["action_net.weight"].shape) != (1, hidden[-1] if hidden else n_in):
        raise ValueError(f"action_net has shape {tuple(state['action_net.weight'].shape)}; expected a 1-D action")
    net = PolicyNet(n_in, hidden, activation)
    mine: dict[str, torch.Tensor] = {"obs_mean": net.obs_mean, "obs_std": net.obs_std}
    for j, i in enumerate(layers):
        mine[f"mlp.{2 * j}.weight"] = state[f"mlp_extractor.policy_net.{i}.weight"]
        mine[f"mlp.{2 * j}.bias"] = state[f"mlp_extractor.policy_net.{i}.bias"]
    mine["action_net.weight"] = state["action_net.weight"]
    mine["action_net.bias"] = state["action_net.bias"]
    net.load_state_dict({k: v.detach().float().cpu() for k, v in mine.items()})
    return net.eval()


def policy_from_sb3(policy: nn.Module) -> PolicyNet:
    """A live SB3 ``ActorCriticPolicy`` (e.g. ``model.policy``) → :class:`PolicyNet`."""
    fn = policy.activation_fn
    act = type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", repr(fn))
    if act not in _ACTIVATION_NAMES:
        raise ValueError(f"activation {act} is not supported by PolicyNet ({sorted(_ACTIVATION_NAMES)})")
    return policy_from_state_dict(policy.state_dict(), _ACTIVATION_NAMES[act])


_MAX_ENTRY = {"data": 2**24, "policy.pth": 2**28}
"""Uncompressed sizes, in bytes, past which an SB3 zip's entries are not read (a 64-64 policy takes ~40 KB)."""


class _Refused(ValueError):
    """A refusal that already says what is wrong (not wrapped as a read error)."""


def read_sb3_zip(path: str | Path) -> PolicyNet:
    """Read the actor of an SB3 PPO ``.zip`` without unpickling anything.

    Raises:
        ValueError: the file is not an SB3 zip with an actor-critic policy for these features.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {"policy.pth", "data"} <= names:
                raise _Refused(f"{path} is a zip but not a Stable-Baselines3 model (no policy.pth/data entries)")
            for name, limit in _MAX_ENTRY.items():  # read() stops at the declared size: a zip bomb must declare it
                if archive.getinfo(name).file_size > limit:
                    raise _Refused(f"{path}: its {name} entry unpacks to {archive.getinfo(name).file_size:,} bytes, "
                                   f"more than an SB3 policy's ({limit:,} at most); not read")
            data = json.loads(archive.read("data"))
            with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: the error below says more
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                state = torch.load(io.BytesIO(archive.read("policy.pth")), map_location="cpu", weights_only=True)
    except _Refused:
        raise
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a zip archive (expected an SB3 .zip or a training run directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: its 'data' entry is not valid JSON ({err})") from None
    except pickle.UnpicklingError:  # weights_only met an object that is not a tensor: never unpickled
        raise ValueError(f"{path}: its policy.pth holds Python objects other than tensors, which could run code when "
                         "unpickled; refused without loading it (export only zips you trust, written by SB3's save)"
                         ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:  # corrupt bytes: weights_only's errors
        raise ValueError(f"{path}: cannot read policy.pth safely ({type(err).__name__}: {err})") from None
    kwargs = data.get("policy_kwargs") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(kwargs or {}, dict):
        raise ValueError(f"{path}: its 'data' entry is not an SB3 model description (a JSON object with a "
                         "'policy_kwargs' object)")
    if data.get("use_sde") or (kwargs or {}).get("use_sde") or (kwargs or {}).get("squash_output"):
        raise ValueError(f"{path}: a policy trained with gSDE or squashed outputs acts through more than its mean "
                         "network, which this export reads; train without use_sde/squash_output")
    act_text = str((kwargs or {}).get("activation_fn", "<class 'torch.nn.modules.activation.Tanh'>"))
    match = re.search(r"\.(\w+)'>$", act_text)
    act = match.group(1) if match else ""
    if act not in _ACTIVATION_NAMES:
        raise ValueError(f"{path}: activation {act_text!r} is not supported ({sorted(_ACTIVATION_NAMES)})")
    try:
        return policy_from_state_dict(state, _ACTIVATION_NAMES[act])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
