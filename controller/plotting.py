"""``plot_history``: a picture of what a :class:`PolicyScheduler` decided, epoch by epoch.

matplotlib is imported inside the function, and only its object-oriented API with the Agg canvas:
``import controller`` stays free of it, and pyplot's global backend (a notebook's, say) is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _entries(history: Any) -> list[Mapping[str, Any]]:
    entries = list(getattr(history, "history", history))  # a PolicyScheduler, or its history
    if not entries:
        raise ValueError("the history is empty: the scheduler has made no decision yet")
    if not all(isinstance(h, Mapping) and "epoch" in h and "lr" in h for h in entries):
        raise ValueError("expected PolicyScheduler.history: a list of dicts with 'epoch' and 'lr'")
    return entries


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) if v is not None and math.isfinite(v) else math.nan for v in values]


def check_image_path(path: str | Path) -> tuple[Path, str]:
    """``path`` (``~`` expanded) and the image format its suffix names, as :func:`plot_history` writes it: the
    suffix, lower-cased, names the format; none is PNG.

    Raises:
        ValueError: ``path`` is a directory, or matplotlib has no writer for its suffix.
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_history needs matplotlib: pip install matplotlib") from err

    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path such as {path / 'lr_history.png'}")
    image_format = path.suffix[1:].lower() or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if image_format not in supported:
        raise ValueError(f"cannot write a {path.suffix!r} image; use one of {', '.join('.' + k for k in sorted(supported))}")
    return path, image_format


def _history_figure(history: Any, title: str | None = None) -> Any:
    """The figure :func:`plot_history` saves (a ``matplotlib.figure.Figure``); tests read its data."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_history needs matplotlib: pip install matplotlib") from err

    entries = _entries(history)
    epochs = [int(h["epoch"]) for h in entries]
    # The LR is a step function: the first epoch's LR from 0 to 1, then each decision's LR from its epoch on.
    first_lr = entries[0].get("epoch_lr", entries[0]["lr"])  # histories saved before epoch_lr existed
    lr_x = [epochs[0] - 1, *epochs]
    lr_y = [float(first_lr), *(float(h["lr"]) for h in entries)]
    cuts = [h for h in entries if h.get("cut")]

    fig = Figure(figsize=(7.0, 6.0), dpi=100, layout="constrained")
    ax_lr, ax_loss, ax_act = fig.subplots(3, 1, sharex=True, height_ratios=[3, 3, 1.4])
    ax_lr.step(lr_x, lr_y, where="post", color="C0", label="learning rate")
    ax_lr.plot(epochs, lr_y[1:], "o", color="C0", markersize=3, label="decision")
    if cuts:
        ax_lr.plot([h["epoch"] for h in cuts], [h["lr"] for h in cuts], "x", color="C3", markersize=8,
                   markeredgewidth=2, label="safety cut")
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("LR (first group)")
    ax_lr.legend(loc="best", fontsize="small")

    for key, color, label in (("train_loss", "C1", "train loss"), ("val_loss", "C2", "validation loss")):
        values = _finite([h.get(key) for h in entries])
        if any(not math.isnan(v) for v in values):
            ax_loss.plot(epochs, values, "o-", color=color, markersize=3, label=label)
    positive = [v for h in entries for v in _finite([h.get("train_loss"), h.get("val_loss")]) if v > 0]
    if positive:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (end of epoch)")
    ax_loss.legend(loc="best", fontsize="small")

    actions = [h.get("action") for h in entries]
    ax_act.bar(epochs, [0.0 if a is None else float(a) for a in actions], width=0.6, color="C4")
    ax_act.axhline(0.0, color="0.5", linewidth=0.8)
    ax_act.set_ylim(-1.05, 1.05)
    ax_act.set_ylabel("action a")
    ax_act.set_xlabel("epoch (decision after it)")
    if title:
        fig.suptitle(title)
    return fig


def plot_history(history: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Draw the learning rate, the losses and the policy's actions over the epochs to an image file.

    Top: the LR each epoch ran with (log scale), a dot at each decision, a red cross where the
    safety cut fired. Middle: the training and validation losses the scheduler received. Bottom:
    the policy's raw action a ∈ [-1, 1] (lr ← lr·2^a before the safety rule; 0 where a non-finite
    loss bypassed the policy).

    Args:
        history: ``scheduler.history`` (a list of dicts), or the :class:`PolicyScheduler` itself.
        path: where to write the image (``~`` expanded, parent directories created); its suffix picks the
            format (``.png``, ``.pdf``, ``.svg``, …), PNG when it has none.
        title: an optional figure title.

    Returns:
        The path written.

    Raises:
        ValueError: an empty history, not a PolicyScheduler history, a path that is a directory, or a suffix
            matplotlib cannot write.
        ImportError: matplotlib is not installed.

    Example:
        >>> from controller import plot_history
        >>> plot_history(scheduler.history, "lr_history.png", title="digits MLP, AdamW")
        PosixPath('lr_history.png')
    """
    path, image_format = check_image_path(path)
    fig = _history_figure(history, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=image_format)
    return path
