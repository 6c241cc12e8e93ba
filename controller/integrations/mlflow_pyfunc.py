"""The exported policy as an MLflow pyfunc model, logged as "models from code".

``train_controller.py`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"policy": <policy.safetensors>})``: no Python object is pickled, the weights travel as the
pickle-free policy file. ``predict`` maps a table of observations, one column per
``controller.features.FEATURE_NAMES`` entry, to LR factors ``2^(scale·a)``. The logged signature names
those columns, so MLflow matches them by name (any order, float32 or float64) and refuses a table that
lacks one: a positional array could silently feed a feature into another's place.

Example:
    >>> from controller import FEATURE_NAMES
    >>> model = mlflow.pyfunc.load_model("models:/lrcontrol-policy/1")
    >>> factors = model.predict(pd.DataFrame(np.zeros((4, 19)), columns=FEATURE_NAMES))   # shape (4,)
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class PolicyModel(PythonModel):
    """Observation table → LR factors, through ``controller.load_policy``."""

    def load_context(self, context):  # noqa: ANN001 - MLflow inspects these signatures; no hints
        from controller.checkpoint import load_policy

        self.net = load_policy(context.artifacts["policy"])

    # The DataFrame hint tells MLflow to validate with the logged signature (and not to advise hints at load).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:  # noqa: ANN001
        """LR factors, one per row. A DataFrame is read by column name; an array (a direct call) by position.

        Raises:
            ValueError: a feature column is missing, an array is not ``(19,)`` or ``(rows, 19)``, or a value is NaN
                or infinite (no feature ever is).
        """
        from controller.actions import lr_factor
        from controller.features import FEATURE_NAMES

        if isinstance(model_input, pd.DataFrame):
            missing = [name for name in FEATURE_NAMES if name not in model_input.columns]
            if missing:
                raise ValueError(f"observation table lacks the feature columns {missing}")
            model_input = model_input[list(FEATURE_NAMES)]
        # a float32 copy: MLflow hands over read-only arrays, which torch would wrap with a warning
        obs = np.array(getattr(model_input, "values", model_input), dtype=np.float32)
        n = self.net.n_features
        if obs.ndim == 1 and obs.shape == (n,):
            obs = obs[None]  # one observation
        if obs.ndim != 2 or obs.shape[1] != n:
            raise ValueError(f"observations must be an array of shape ({n},) or (rows, {n}), one column per "
                             f"feature in FEATURE_NAMES order, got shape {obs.shape}")
        bad = ~np.isfinite(obs)
        if bad.any():
            rows, cols = np.nonzero(bad)
            raise ValueError(f"observations must be finite: row {rows[0]}, feature {FEATURE_NAMES[cols[0]]!r} is "
                             f"{obs[rows[0], cols[0]]} ({int(bad.sum())} non-finite values in all)")
        with torch.no_grad():
            actions = self.net(torch.from_numpy(obs)).numpy()[:, 0]
        return np.array([lr_factor(a, self.net.action_config) for a in actions], dtype=np.float64)


mlflow.models.set_model(PolicyModel())
