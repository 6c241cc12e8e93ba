"""Make the README's "Seeing what it decided" picture from a real (small) training run.

Trains an MLP on scikit-learn's bundled digits (offline, ~1 s on one CPU core) with AdamW started at a
deliberately low LR (1e-4, 10x below the usual 1e-3), the LR set once per epoch by a ``PolicyScheduler``, then draws
``scheduler.history`` with ``plot_history``.
The run is seeded, so the picture is reproducible. Regenerate it when the default policy changes:

    python docs/make_history_plot.py                     # bundled default policy -> docs/lr_history.png
    python docs/make_history_plot.py --policy P.safetensors --out /tmp/p.png

The arguments are checked before any training: ``--epochs`` >= 2 (the project's smallest epoch budget), a positive
``--lr``, a readable ``--policy`` file, and an ``--out`` that is no directory with an image suffix matplotlib writes
(``.png``, ``.pdf``, ``.svg``, …; PNG when it has none).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
from controller import PolicyScheduler, load_policy, plot_history  # noqa: E402
from controller.plotting import check_image_path  # noqa: E402


def run(policy: str | None, epochs: int, lr: float, seed: int) -> PolicyScheduler:
    """One seeded training run; returns its scheduler (``.history`` holds the decisions)."""
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    train, val = order[:1400], order[1400:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = PolicyScheduler(optimizer, total_epochs=epochs, policy=policy)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        total = 0.0
        for batch in train[torch.randperm(len(train))].split(64):
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            logits = model(x[val])
            val_loss = loss_fn(logits, y[val]).item()
            accuracy = (logits.argmax(1) == y[val]).float().mean().item()
        scheduler.step(val_loss, train_loss=total / len(train), val_accuracy=accuracy)
    return scheduler


MIN_EPOCHS = 2
"""The smallest epoch budget the project runs (``envs.tasks.check_epoch_range``): at least one decision that sets the
LR of an epoch still to come."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None, help="policy file (default: the bundled default policy)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the run (>= 2; default 30)")
    # 1e-4 is 10x below AdamW's usual 1e-3: the run has something to correct, so the picture shows
    # the decisions that matter (raise a too-low LR, then anneal).
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW's initial LR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "lr_history.png")
    args = parser.parse_args()
    if args.epochs < MIN_EPOCHS:
        parser.error(f"--epochs must be >= {MIN_EPOCHS}, got {args.epochs}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive finite number, got {args.lr}")
    try:  # plot_history's own check, before the training rather than after it
        check_image_path(args.out)
    except ValueError as err:
        parser.error(f"--out: {err}")
    try:
        placeholder = load_policy(args.policy).metadata.get("placeholder", False)
    except (OSError, ValueError) as err:  # no such file, or no policy file
        parser.error(f"--policy: {err}")
    torch.set_num_threads(1)
    scheduler = run(args.policy, args.epochs, args.lr, args.seed)
    name = "bundled default policy" if args.policy is None else Path(args.policy).name
    title = f"digits MLP, AdamW lr={args.lr:g}, {name}" + (" (placeholder: a = 0)" if placeholder else "")
    path = plot_history(scheduler.history, args.out, title=title)
    last = scheduler.history[-1]
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB): {len(scheduler.history)} decisions, "
          f"final LR {last['lr']:.3g}, val loss {last['val_loss']:.4f}, val accuracy {last['val_accuracy']:.3f}, "
          f"{sum(h['cut'] for h in scheduler.history)} safety cuts")


if __name__ == "__main__":
    main()
