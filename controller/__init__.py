"""A learned learning-rate controller for PyTorch, shipped as a drop-in LR scheduler.

Torch, numpy and safetensors only: importing this package loads no gymnasium, stable_baselines3,
mlflow, click, matplotlib (``plot_history`` imports it when called) or trainer library (the
integrations in :mod:`controller.integrations` import theirs).

Example:
    >>> from controller import PolicyScheduler
    >>> scheduler = PolicyScheduler(optimizer, total_epochs=30)
    >>> for epoch in range(30):
    ...     train_loss = train_one_epoch(model, optimizer)
    ...     scheduler.step(evaluate(model), train_loss=train_loss)
"""

from controller.actions import ActionConfig, lr_factor, next_lr
from controller.checkpoint import default_policy_path, load_policy, read_metadata, save_policy
from controller.features import FEATURE_NAMES, N_FEATURES, FeatureBuilder
from controller.plotting import plot_history
from controller.policy import PolicyNet
from controller.scheduler import PolicyScheduler
from controller.signals import StepStats, StepStatsHook

__all__ = [
    "FEATURE_NAMES",
    "N_FEATURES",
    "ActionConfig",
    "FeatureBuilder",
    "PolicyNet",
    "PolicyScheduler",
    "StepStats",
    "StepStatsHook",
    "default_policy_path",
    "load_policy",
    "lr_factor",
    "next_lr",
    "plot_history",
    "read_metadata",
    "save_policy",
]
__version__ = "0.1.0"
