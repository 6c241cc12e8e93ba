"""The pickle-free policy file: safetensors weights with JSON metadata in the same file.

Layout: a standard ``.safetensors`` file whose header metadata holds one key, ``"lrcontrol"``, a JSON
document::

    {"format": "lrcontrol-policy", "format_version": 1,
     "feature_names": [...],            # must equal controller.features.FEATURE_NAMES
     "action_map": {"kind": "exp2", "scale": 1.0, "max_ratio": ..., ...},
     "net": {"n_features": 19, "hidden": [64, 64], "activation": "tanh", "obs_clip": 10.0},
     "placeholder": false, "description": "...", "training": {...}}

Loading never unpickles anything: the header is parsed as JSON and the tensors as raw bytes. A
pickle, an SB3 ``.zip``, a truncated file or one written for other features is refused with a
``ValueError`` that says which.
"""

from __future__ import annotations

import json
import re
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from controller.actions import ActionConfig
from controller.features import FEATURE_NAMES
from controller.policy import PolicyNet

FORMAT = "lrcontrol-policy"
FORMAT_VERSION = 1
METADATA_KEY = "lrcontrol"
DEFAULT_POLICY_NAME = "default.safetensors"
_MAX_HEADER = 16 * 1024 * 1024


def default_policy_path() -> Path:
    """The bundled default policy: installed package data, or ``checkpoints/`` in a source tree."""
    try:
        packaged = resources.files("controller.checkpoints") / DEFAULT_POLICY_NAME
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    source_tree = Path(__file__).resolve().parent.parent / "checkpoints" / DEFAULT_POLICY_NAME
    if source_tree.is_file():
        return source_tree
    raise FileNotFoundError(
        "the bundled default policy is missing: neither the installed package data nor "
        f"{source_tree} exists (reinstall the package)"
    )


def save_policy(
    path: str | Path,
    net: PolicyNet,
    *,
    action_config: ActionConfig = ActionConfig(),
    placeholder: bool = False,
    description: str = "",
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``net`` and its metadata to ``path`` (a ``.safetensors`` file). Returns the path."""
    if net.n_features != len(FEATURE_NAMES):
        raise ValueError(f"net takes {net.n_features} features, FEATURE_NAMES has {len(FEATURE_NAMES)}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "action_map": action_config.to_dict(),
        "net": net.shape_dict(),
        "placeholder": bool(placeholder),
        "description": description,
        "training": training or {},
    }
    tensors = {k: v.detach().cpu().contiguous().float() for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(st_save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)}))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def _refuse(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a usable lrcontrol policy file: {why}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Parse and validate the metadata of a policy file without loading its tensors."""
    return _parse(Path(path))[0]


def _parse(path: Path) -> tuple[dict[str, Any], bytes]:
    if path.is_dir():
        raise _refuse(path, "it is a directory; give the .safetensors file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"policy file not found: {path}")
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        raise _refuse(
            path,
            "it is a zip archive (a torch.save file or a Stable-Baselines3 .zip?). Both hold pickled code and are "
            "never loaded here; convert an SB3 run you trust with `python train_controller.py export RUN_DIR OUT`",
        )
    looks_pickled = data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if len(data) < 8:
        raise _refuse(path, f"only {len(data)} bytes; truncated or empty")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER or 8 + header_len > len(data):
        # protocols 2-5 start with PROTO; 0 and 1 with a container or a GLOBAL (b"cos\nsystem\n": module, name)
        if looks_pickled or data[:2] in (b"(d", b"(l", b"}q", b"]q") or re.match(rb"c[\w.]+\n\w+\n", data[:200]):
            raise _refuse(path, "it looks like a Python pickle; pickles are never loaded (they can run code)")
        raise _refuse(path, "the safetensors header is larger than the file: truncated or not a safetensors file")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        if looks_pickled:
            raise _refuse(path, "it looks like a Python pickle; pickles are never loaded (they can run code)") from None
        raise _refuse(path, f"the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _refuse(path, "the safetensors header is not a JSON object")
    header_meta = header.get("__metadata__") or {}
    if not isinstance(header_meta, dict):
        raise _refuse(path, "its safetensors '__metadata__' is not a JSON object")
    raw = header_meta.get(METADATA_KEY)
    if raw is None:
        raise _refuse(path, f"a safetensors file without '{METADATA_KEY}' metadata (not written by save_policy)")
    if not isinstance(raw, str):
        raise _refuse(path, f"its '{METADATA_KEY}' metadata is not a JSON string")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise _refuse(path, f"its '{METADATA_KEY}' metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _refuse(path, f"metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _refuse(path, f"invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise _refuse(
            path, f"format_version {version} is newer than this library reads ({FORMAT_VERSION}); upgrade the package"
        )
    names = meta.get("feature_names")
    if names != list(FEATURE_NAMES):
        if not isinstance(names, list):
            raise _refuse(path, f"feature_names is {names!r}, not a list of names")
        missing = [n for n in FEATURE_NAMES if n not in names]
        extra = [n for n in names if n not in FEATURE_NAMES]
        raise _refuse(
            path,
            "it was trained on other features than this library computes "
            f"(missing {missing}, unknown {extra}; order must match controller.features.FEATURE_NAMES)",
        )
    return meta, data


def load_policy(path: str | Path | None = None) -> PolicyNet:
    """Load a policy file (default: the bundled policy) as a :class:`PolicyNet` in eval mode.

    The returned module carries ``.metadata`` (the parsed JSON) and ``.action_config``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a policy file written by :func:`save_policy` for these features — a pickle,
            an SB3 zip, a truncated or corrupt file (metadata of the wrong type or an impossible net
            shape included), weights that are not floating point, non-finite weights or a normalisation
            std <= 0, a newer format version,
            or a directory.
    """
    if isinstance(path, str) and not path.strip():
        raise ValueError("policy path is empty: give a policy file, or None for the bundled policy")
    path = default_policy_path() if path is None else Path(path)
    meta, data = _parse(path)
    try:
        if not isinstance(meta["action_map"], dict) or not isinstance(meta["net"], dict):
            raise ValueError("'action_map' and 'net' must be JSON objects")
        action_config = ActionConfig.from_dict(meta["action_map"])
        shape = meta["net"]

        def build() -> PolicyNet:
            return PolicyNet(shape["n_features"], tuple(shape["hidden"]), shape["activation"],
                             obs_clip=shape.get("obs_clip", 10.0))

        with torch.device("meta"):  # the declared shape, allocating nothing (a tiny file may declare a huge net)
            declared = build()
        if declared.n_features != len(FEATURE_NAMES):
            raise ValueError(f"a net of {declared.n_features} inputs for {len(FEATURE_NAMES)} feature names")
        expected = {k: tuple(t.shape) for k, t in declared.state_dict().items()}
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:  # Runtime: a size past int64
        raise _refuse(path, f"invalid metadata ({err})") from None
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise _refuse(path, f"corrupt or truncated tensor data ({err})") from None
    not_real = sorted(f"{k} ({t.dtype})" for k, t in tensors.items() if not t.is_floating_point())
    if not_real:  # load_state_dict would cast them: truncated ints, bools, complex numbers less their imaginary part
        raise _refuse(path, f"its weights must be real floating-point tensors, got {', '.join(not_real)}")
    found = {k: tuple(t.shape) for k, t in tensors.items()}
    if found != expected:
        wrong = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
        in_file, declared_shapes = [found.get(k) for k in wrong], [expected.get(k) for k in wrong]
        raise _refuse(path, f"weights do not match the declared net shape ({', '.join(wrong)}: {in_file} in the "
                            f"file, {declared_shapes} declared)")
    net = build()
    net.load_state_dict(tensors, strict=True)
    if not all(torch.isfinite(t).all() for t in net.state_dict().values()):
        raise _refuse(path, "it contains non-finite weights")
    if not (net.obs_std > 0).all():
        raise _refuse(path, "its observation normalisation has a standard deviation <= 0 (every action would be NaN)")
    net.metadata = meta
    net.action_config = action_config
    return net.eval()
