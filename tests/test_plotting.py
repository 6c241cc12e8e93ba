"""controller.plot_history: a PNG of what the scheduler decided."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from controller import PolicyNet, PolicyScheduler, plot_history, save_policy
from controller.features import N_FEATURES

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install matplotlib")


@pytest.fixture
def scheduler(tmp_path):
    """Five decisions of a random policy, one of them on a NaN loss (a cut, no action)."""
    torch.manual_seed(1234)
    policy = save_policy(tmp_path / "p.safetensors", PolicyNet(N_FEATURES, hidden=(16,)))
    optimizer = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1)
    scheduler = PolicyScheduler(optimizer, total_epochs=5, policy=policy)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        warnings.filterwarnings("ignore", "PolicyScheduler decision .* follows no optimizer step")  # no training
        for val in (1.0, 0.8, math.nan, 0.7, 0.65):
            scheduler.step(val, train_loss=None if val == 0.8 else 0.9 * val)
    return scheduler


def test_plot_history_writes_a_small_png(scheduler, tmp_path):
    path = plot_history(scheduler.history, tmp_path / "figs" / "history.png", title="tiny run")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (700, 600)
    assert len(data) < 200_000
    assert plot_history(scheduler, tmp_path / "again.png").read_bytes()[:8] == data[:8]  # the scheduler itself


def test_plotted_lr_is_the_lr_each_epoch_ran_with(scheduler):
    from controller.plotting import _history_figure

    history = scheduler.history
    ax_lr, ax_loss, ax_act = _history_figure(history).axes
    x, y = ax_lr.lines[0].get_data()
    assert list(x) == [0, 1, 2, 3, 4, 5]
    assert list(y) == [0.1, *(h["lr"] for h in history)]
    assert [h["epoch_lr"] for h in history[1:]] == [h["lr"] for h in history[:-1]]
    cut_x, _ = ax_lr.lines[2].get_data()
    assert list(cut_x) == [h["epoch"] for h in history if h["cut"]] and 3 in cut_x
    val_x, val_y = ax_loss.lines[1].get_data()
    assert list(val_x) == [1, 2, 3, 4, 5] and math.isnan(val_y[2]) and val_y[4] == 0.65
    assert [bar.get_height() for bar in ax_act.patches] == [h["action"] or 0.0 for h in history]


def test_plot_history_writes_the_format_its_suffix_names(scheduler, tmp_path):
    assert plot_history(scheduler, tmp_path / "h.pdf").read_bytes()[:5] == b"%PDF-"  # not PNG bytes in a .pdf
    assert b"<svg" in plot_history(scheduler, tmp_path / "h.svg").read_bytes()[:400]
    assert plot_history(scheduler, tmp_path / "h").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # no suffix: PNG
    with pytest.raises(ValueError, match=r"cannot write a '.xyz' image; use one of .*\.png"):
        plot_history(scheduler, tmp_path / "h.xyz")
    with pytest.raises(ValueError, match="is a directory"):
        plot_history(scheduler, tmp_path)


def test_plot_history_refuses_an_empty_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_history([], tmp_path / "x.png")


def test_plot_history_leaves_pyplot_and_its_backend_alone(scheduler, tmp_path):
    (tmp_path / "history.json").write_text(json.dumps(scheduler.history))  # NaN survives as JSON's NaN
    code = (
        "import json, sys, controller\n"
        f"controller.plot_history(json.loads(open({str(tmp_path / 'history.json')!r}).read()), "
        f"{str(tmp_path / 'p.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("history", [[0.1, 0.2], [{"lr": 0.1}], [{"epoch": 1}], "not a history"])
def test_plot_history_refuses_what_is_no_scheduler_history(history, tmp_path):
    with pytest.raises(ValueError, match=r"expected PolicyScheduler.history: a list of dicts with 'epoch' and 'lr'"):
        plot_history(history, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def entry(epoch, lr, **kw):
    return {"epoch": epoch, "lr": lr, "epoch_lr": lr, "train_loss": 1.0, "val_loss": 1.0, "action": 0.0,
            "cut": False, **kw}


def test_plot_history_draws_what_each_entry_says(tmp_path):
    """Cut markers where the safety cut fired (whether the policy acted or not), an infinite loss as a gap, the
    action axis fixed at [-1, 1], the title, and a history that starts later than epoch 1 (its first LR from the
    epoch before)."""
    from controller.plotting import _history_figure

    history = [entry(3, 0.1, action=0.5), entry(4, 0.025, cut=True, action=0.5, val_loss=math.inf),
               entry(5, 0.025, cut=True, action=None, val_loss=math.nan), entry(6, 0.03, action=0.2)]
    fig = _history_figure(history, title="a later window")
    ax_lr, ax_loss, ax_act = fig.axes
    assert list(ax_lr.lines[0].get_data()[0]) == [2, 3, 4, 5, 6]
    assert list(ax_lr.lines[2].get_data()[0]) == [4, 5]  # both cuts, the one after an action too
    val_y = ax_loss.lines[1].get_data()[1]
    assert math.isnan(val_y[1]) and math.isnan(val_y[2]) and val_y[3] == 1.0  # inf drawn as a gap, as NaN is
    assert ax_act.get_ylim() == (-1.05, 1.05)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "a later window"


def test_plot_history_draws_only_the_losses_it_was_given_on_a_scale_that_shows_them():
    """A loss never passed (no ``train_loss``) gets no line and no legend entry; losses that are never positive (a
    negative log-likelihood, say) keep a linear axis, on which a log axis would drop them."""
    from controller.plotting import _history_figure

    history = [entry(e, 0.1, train_loss=None, val_loss=-e / 10) for e in (1, 2, 3)]
    _, ax_loss, _ = _history_figure(history).axes
    assert [line.get_label() for line in ax_loss.lines] == ["validation loss"]
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["validation loss"]
    assert ax_loss.get_yscale() == "linear"
    _, ax_loss, _ = _history_figure([entry(1, 0.1), entry(2, 0.1)]).axes
    assert ax_loss.get_yscale() == "log"


def test_plot_history_expands_a_home_path_and_reads_the_suffix_in_any_case(scheduler, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert plot_history(scheduler, "~/figs/h.PNG") == tmp_path / "figs" / "h.PNG"
    assert (tmp_path / "figs" / "h.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_history(scheduler, tmp_path / "h.PDF").read_bytes()[:5] == b"%PDF-"
