"""The exported policy as an MLflow pyfunc model, logged as "models from code".

``train_controller.py`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"policy": <policy.safetensors>})``: no Python object is pickled, the weights travel as the
pickle-free policy file. ``predict`` maps a batch of observation vectors
(``controller.features.FEATURE_NAMES`` columns) to LR factors ``2^(scale·a)``.

Example:
    >>> model = mlflow.pyfunc.load_model("models:/lrcontrol-policy/1")
    >>> factors = model.predict(np.zeros((4, 19), dtype=np.float32))   # shape (4,)
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class PolicyModel(PythonModel):
    """Observation batch → LR factors, through ``controller.load_policy``."""

    def load_context(self, context):  # noqa: ANN001 - MLflow inspects these signatures; no hints
        from controller.checkpoint import load_policy

        self.net = load_policy(context.artifacts["policy"])

    # The ndarray hint tells MLflow to validate with the logged signature (and not to advise hints at load).
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # noqa: ANN001
        from controller.actions import lr_factor

        # a copy: MLflow hands over read-only arrays, which torch would wrap with a warning
        obs = np.array(getattr(model_input, "values", model_input), dtype=np.float32)
        with torch.no_grad():
            actions = self.net(torch.from_numpy(obs).reshape(-1, self.net.n_features)).numpy()[:, 0]
        return np.array([lr_factor(a, self.net.action_config) for a in actions], dtype=np.float64)


mlflow.models.set_model(PolicyModel())
