"""``PolicyScheduler`` inside the trainers people use: one module per trainer, each an optional extra.

- :mod:`controller.integrations.lightning` — PyTorch Lightning (``pip install 'lrcontrol[lightning]'``).
- :mod:`controller.integrations.hf` — Hugging Face ``Trainer`` (``pip install 'lrcontrol[hf]'``).

This package imports neither library; each submodule imports its own and says which extra to
install when it is missing, so ``import controller`` stays light.
"""
