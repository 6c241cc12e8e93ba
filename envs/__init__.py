"""Training-time side of the project: the inner task suite and the ``LRControl-v0`` environment.

Importing this package registers ``LRControl-v0`` with Gymnasium.

Example:
    >>> import gymnasium as gym, envs
    >>> env = gym.make("LRControl-v0")
    >>> obs, info = env.reset(seed=0, options={"family": "digits_mlp"})
"""

import gymnasium as gym

from envs.inner import EpochResult, InnerRun, TorchRun
from envs.lr_env import EnvConfig, Episode, LRControlEnv, check_device, resolve_device
from envs.tasks import (
    FAMILIES,
    LOCAL_FAMILIES,
    TEST_FAMILIES,
    TRAIN_FAMILIES,
    VALIDATION_FAMILIES,
    TaskConfig,
    TaskFamily,
    build_task,
    check_local_data,
    get_family,
)

ENV_ID = "LRControl-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.lr_env:LRControlEnv")

__all__ = [
    "ENV_ID",
    "FAMILIES",
    "LOCAL_FAMILIES",
    "TEST_FAMILIES",
    "TRAIN_FAMILIES",
    "VALIDATION_FAMILIES",
    "EnvConfig",
    "EpochResult",
    "Episode",
    "InnerRun",
    "LRControlEnv",
    "TaskConfig",
    "TaskFamily",
    "TorchRun",
    "build_task",
    "check_device",
    "check_local_data",
    "get_family",
    "resolve_device",
]
