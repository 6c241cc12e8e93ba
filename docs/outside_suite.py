"""The bundled policy on training setups unlike any task family of this repository, run as a user runs it.

The evaluation of ``train_controller.py evaluate`` draws its tasks from the repository's task families. This script
checks the policy outside them, in a plain training loop that calls ``PolicyScheduler.step`` as the README shows.
Six scenarios, each a way in which a user's run can differ from everything the policy trained on (at most ~3,000
samples, 10-40 epochs, <= ~150k parameters, SGD with momentum 0.9, Adam or AdamW, minibatches):

- ``iris_fullbatch``: iris (an unused dataset), full-batch Adam: one optimizer step per epoch, 100 epochs.
- ``circles_plain_sgd``: two circles, SGD with no momentum (its usual LR is not SGD-with-momentum's).
- ``regression_large_scale``: a regression on unscaled targets (a mean squared error of ~1e4 at the start).
- ``rmsprop``: RMSprop, an optimizer the policy never saw (its optimizer features both read 0).
- ``long_100_epochs``: a 100-epoch budget on a noisy classification (2.5x the longest training budget).
- ``wide_1M_params``: an MLP of 1.1M parameters (7x the largest trained on).

They were written down before the policy ran on any of them, and nothing was trained, selected or tuned on them.
Each starts at x0.1, x1 and x10 its usual LR under: the policy (for classification, once with ``val_accuracy`` and
once without, as the README's loop passes none), constant, cosine annealing, OneCycle and ReduceLROnPlateau (the
definitions of :func:`envs.evaluation.make_baseline`). Score as in the model card: final test loss / the best final
test loss of cosine annealing over the LR grid ``envs.evaluation.ORACLE_GRID`` (x1/27 ... x27 the usual LR), capped at
``RATIO_CAP`` (a diverged run scores the cap). A seed draws the data, its split and the initialisation; the first
table is, per seed, the geometric mean over scenarios (mean +- std over seeds), the second each scenario's mean +- std
over seeds. Data: 60 % train, 20 % validation (what the schedules see), 20 % test.

    python docs/outside_suite.py --out o.json          # 5 seeds, ~12 min on 2 cores; prints Markdown tables
    python docs/outside_suite.py --tables o.json       # the tables again, from the saved runs
    python docs/outside_suite.py --tables o.json --plot docs/outside_suite_lrs.png   # and the LR paths of seed 0
    python docs/outside_suite.py --seeds 1 --scenarios iris_fullbatch
    python docs/outside_suite.py --from-tuned --out t.json    # every schedule from the LR a grid search picks

``--from-tuned`` starts every schedule at the LR a practitioner who tuned it would use: the grid LR whose cosine run has
the lowest final validation loss, per scenario and seed (as ``docs/tuned_start.py`` does on the task families). It runs
the policy without accuracy, free and with ``max_lr`` = that LR (``policy_capped``: it can only lower the LR).

``--out`` and ``--plot`` are checked before anything runs (their directory must exist), and the tables are printed
before either is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import datasets
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
from controller import PolicyScheduler  # noqa: E402
from envs.evaluation import (  # noqa: E402
    MULTIPLIERS,
    ORACLE_GRID,
    RATIO_CAP,
    Evaluation,
    RunRecord,
    grid_search_picks,
    make_baseline,
    make_pool,
    oracle_losses,
    ratio_to,
)

SCHEDULES = ("policy", "policy_no_acc", "constant", "cosine", "onecycle", "plateau")
"""``policy_no_acc``: the policy given no validation accuracy (classification only)."""
TUNED_SCHEDULES = ("policy_no_acc", "policy_capped", "constant", "cosine", "onecycle", "plateau")
"""From the tuned LR (``--from-tuned``); ``policy_capped``: the policy with ``max_lr`` = that LR, no accuracy."""


@dataclass
class Scenario:
    data: Callable[[int], tuple[np.ndarray, np.ndarray]]  # seed -> (X, y)
    model: Callable[[], nn.Module]
    optimizer: str
    lr: float  # the usual LR for this optimizer and model
    batch: int  # 0: full batch
    epochs: int
    regression: bool = False


SCENARIOS: dict[str, Scenario] = {
    "iris_fullbatch": Scenario(
        lambda seed: datasets.load_iris(return_X_y=True),
        lambda: nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 3)), "adam", 1e-3, 0, 100),
    "circles_plain_sgd": Scenario(
        lambda seed: datasets.make_circles(1500, noise=0.1, factor=0.5, random_state=seed),
        lambda: nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)),
        "sgd", 0.05, 32, 40),
    "regression_large_scale": Scenario(
        lambda seed: datasets.make_regression(2000, 20, n_informative=10, noise=10.0, random_state=seed),
        lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1)), "adam", 1e-3, 64, 30, regression=True),
    "rmsprop": Scenario(
        lambda seed: datasets.make_classification(2000, 20, n_informative=10, n_classes=5, random_state=seed),
        lambda: nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 5)), "rmsprop", 1e-3, 64, 30),
    "long_100_epochs": Scenario(
        lambda seed: datasets.make_classification(2000, 20, n_informative=8, n_classes=4, flip_y=0.05,
                                                  random_state=seed),
        lambda: nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 4)), "adamw", 1e-3, 128, 100),
    "wide_1M_params": Scenario(
        lambda seed: datasets.make_classification(2000, 50, n_informative=20, n_classes=10, random_state=seed),
        lambda: nn.Sequential(nn.Linear(50, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)),
        "adam", 1e-3, 128, 15),
}

OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),  # no momentum
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
}


def splits(name: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train, validation, test) tensors: a seeded 60/20/20 split, features standardised on the training part."""
    scenario = SCENARIOS[name]
    x, y = scenario.data(seed)
    order = np.random.default_rng(seed).permutation(len(x))
    parts = np.split(order, [int(0.6 * len(x)), int(0.8 * len(x))])
    mean, std = x[parts[0]].mean(0), x[parts[0]].std(0) + 1e-8
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32 if scenario.regression else torch.long)
    return [(xt[p], yt[p]) for p in parts]


def run(job: tuple[str, int, float, str]) -> RunRecord:
    """One training run: ``(scenario, seed, LR multiplier, schedule)`` -> its record (``family``: the scenario)."""
    name, seed, multiplier, schedule = job
    torch.set_num_threads(1)
    scenario = SCENARIOS[name]
    (x, y), (x_val, y_val), (x_test, y_test) = splits(name, seed)
    torch.manual_seed(seed)
    model = scenario.model()
    optimizer = OPTIMIZERS[scenario.optimizer](model.parameters(), scenario.lr * abs(multiplier))  # < 0: oracle grid
    batch = scenario.batch or len(x)
    steps = math.ceil(len(x) / batch)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.squeeze(-1), target) if scenario.regression else F.cross_entropy(out, target)

    policy = schedule.startswith("policy")
    cap = scenario.lr * abs(multiplier) if schedule == "policy_capped" else math.inf
    scheduler = PolicyScheduler(optimizer, total_epochs=scenario.epochs, max_lr=cap) if policy else make_baseline(
        schedule, optimizer, scenario.epochs, steps)
    generator = torch.Generator().manual_seed(seed)
    record = RunRecord(name, seed, multiplier, schedule)
    with torch.no_grad():
        record.initial_test = loss_fn(model(x_test), y_test).item()
    for epoch in range(1, scenario.epochs + 1):
        record.lrs.append(optimizer.param_groups[0]["lr"])
        model.train()
        total = 0.0
        for index in torch.randperm(len(x), generator=generator).split(batch):
            optimizer.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            if schedule == "onecycle":
                scheduler.step()
            total += loss.item()
        model.eval()
        with torch.no_grad():
            out = model(x_val)
            val_loss = loss_fn(out, y_val).item()
            accuracy = None if scenario.regression else (out.argmax(-1) == y_val).float().mean().item()
        record.train_losses.append(total / steps)
        record.val_losses.append(val_loss)
        if not (math.isfinite(total) and math.isfinite(val_loss)):
            record.diverged = True
            break
        if epoch == scenario.epochs:
            break
        if policy:
            scheduler.step(val_loss, train_loss=total / steps,
                           val_accuracy=accuracy if schedule == "policy" else None)
        elif schedule == "plateau":
            scheduler.step(val_loss)
        elif schedule == "cosine":
            scheduler.step()
    record.final_val = record.val_losses[-1]
    with torch.no_grad():
        record.final_test = math.inf if record.diverged else loss_fn(model(x_test), y_test).item()
    if not math.isfinite(record.final_test):
        record.diverged, record.final_test = True, math.inf
    return record


def grid_jobs(names: list[str], seeds: int) -> list[tuple[str, int, float, str]]:
    """The oracle's grid runs: cosine at each grid LR (a negative multiplier), for every scenario and seed."""
    return [(name, seed, -grid, "cosine") for name in names for seed in range(seeds) for grid in ORACLE_GRID]


def jobs(names: list[str], seeds: int) -> list[tuple[str, int, float, str]]:
    """The oracle's grid runs and every schedule at each multiplier, for every seed."""
    return grid_jobs(names, seeds) + [
        (name, seed, m, s) for name in names for seed in range(seeds) for m in MULTIPLIERS for s in SCHEDULES
        if not (s == "policy_no_acc" and SCENARIOS[name].regression)]


def tuned_jobs(grid: list[RunRecord]) -> list[tuple[str, int, float, str]]:
    """Every schedule but cosine (the grid run itself) from each scenario and seed's tuned LR."""
    return [(name, seed, -r.multiplier, s) for (name, seed), r in grid_search_picks(grid).items()
            for s in TUNED_SCHEDULES if s != "cosine"]


def _with_policy_no_acc(records: list[RunRecord]) -> list[RunRecord]:
    """``records`` and, on a regression (no accuracy either way), a copy of each policy run as ``policy_no_acc``."""
    return records + [replace(r, schedule="policy_no_acc") for r in records
                      if r.schedule == "policy" and SCENARIOS[r.family].regression]


def _row(cells: list[tuple[float, float]]) -> list[str]:
    """``mean ± std`` per schedule, the lowest mean in bold."""
    best = min(mean for mean, _ in cells)
    return [("**{}**" if mean == best else "{}").format(f"{mean:.2f} ± {std:.2f}") for mean, std in cells]


def _evaluation(records: list[RunRecord], multipliers: list[float], schedules: tuple[str, ...],
                runs: list[RunRecord]) -> Evaluation:
    """``runs`` scored against the oracle of ``records``' grid, as ``envs.evaluation`` scores the task families."""
    names = list(dict.fromkeys(r.family for r in records))
    seeds = 1 + max(r.seed for r in records)
    return Evaluation(names, seeds, multipliers, list(schedules), runs, oracle_losses(records))


def tables(records: list[RunRecord]) -> str:
    """Markdown: per initial LR, the geometric mean over scenarios (per seed; mean ± std over seeds), then each
    scenario's mean ± std over seeds. On a regression the policy gets no accuracy either way, so its run also stands
    for ``policy_no_acc``."""
    runs = [r for r in _with_policy_no_acc(records) if r.multiplier > 0]
    ev = _evaluation(records, list(MULTIPLIERS), SCHEDULES, runs)
    columns = {m: _row([ev.aggregate(s, m) for s in SCHEDULES]) for m in MULTIPLIERS}
    lines = ["| schedule | " + " | ".join(f"×{m:g}" for m in MULTIPLIERS) + " |", "|---|" + "---|" * len(MULTIPLIERS)]
    lines += [f"| {s} | " + " | ".join(columns[m][i] for m in MULTIPLIERS) + " |" for i, s in enumerate(SCHEDULES)]
    lines += ["", "| scenario | init LR | " + " | ".join(SCHEDULES) + " |", "|---|---|" + "---|" * len(SCHEDULES)]
    for n in ev.families:
        for m in MULTIPLIERS:
            lines.append(f"| {n} | ×{m:g} | " + " | ".join(_row([ev.aggregate(s, m, n) for s in SCHEDULES])) + " |")
    return "\n".join(lines)


def tuned_tables(records: list[RunRecord]) -> str:
    """Markdown for ``--from-tuned``: the geometric mean over scenarios from the tuned LR, then each scenario's
    ratios and the grid LR its seeds picked. Every run from the tuned LR is scored as ``x1`` of it; cosine's is the
    tuned grid run itself."""
    starts = grid_search_picks(records)
    runs = [replace(r, multiplier=1.0) for r in [r for r in records if r.multiplier > 0] + list(starts.values())]
    ev = _evaluation(records, [1.0], TUNED_SCHEDULES, runs)
    lines = ["| schedule | from the tuned LR |", "|---|---|"]
    lines += [f"| {s} | {cell} |" for s, cell in zip(TUNED_SCHEDULES, _row([ev.aggregate(s, 1.0)
                                                                               for s in TUNED_SCHEDULES]))]
    lines += ["", "| scenario | tuned LR (× usual, per seed) | " + " | ".join(TUNED_SCHEDULES) + " |",
              "|---|---|" + "---|" * len(TUNED_SCHEDULES)]
    for n in ev.families:
        picked = ", ".join(f"{-starts[n, seed].multiplier:.3g}" for seed in range(ev.seeds))
        lines.append(f"| {n} | {picked} | " + " | ".join(_row([ev.aggregate(s, 1.0, n) for s in TUNED_SCHEDULES]))
                     + " |")
    return "\n".join(lines)


COLORS = {"policy_no_acc": "C0", "policy_capped": "C3", "cosine": "C1", "plateau": "C2"}
"""One colour per schedule in both plots (the capped policy dashed: it often lies on the free one)."""


def plot(records: list[RunRecord], path: Path, seed: int = 0) -> None:
    """One panel per scenario: the LR each epoch ran at (log scale) from the usual LR (``--from-tuned``: from the
    tuned LR) for one seed, under the policy without accuracy, cosine and ReduceLROnPlateau (and the capped policy
    from a tuned LR), with the oracle's best grid LR dashed; each label holds its run's ratio to the oracle."""
    from matplotlib.figure import Figure

    oracle, starts = oracle_losses(records), grid_search_picks(records)
    tuned = any(r.schedule == "policy_capped" for r in records)
    names = list(dict.fromkeys(r.family for r in records))
    schedules = ("policy_no_acc", "policy_capped", "cosine", "plateau") if tuned else ("policy_no_acc", "cosine",
                                                                                        "plateau")
    fig = Figure(figsize=(4.2 * min(len(names), 3), 3.4 * math.ceil(len(names) / 3)), layout="constrained")
    axes = fig.subplots(math.ceil(len(names) / 3), min(len(names), 3), squeeze=False).ravel()
    for ax, name in zip(axes, names):
        key = (name, seed)
        runs = {r.schedule: r for r in _with_policy_no_acc(records) if (r.family, r.seed) == key and r.multiplier == (
            -starts[key].multiplier if tuned else 1.0)}
        if tuned:
            runs["cosine"] = starts[key]
        for schedule in schedules:
            r = runs[schedule]
            ax.step(range(1, len(r.lrs) + 1), r.lrs, where="post", color=COLORS[schedule],
                    linestyle="--" if schedule == "policy_capped" else "-",
                    label=f"{schedule} ({ratio_to(r.final_test, oracle[f'{name}/{seed}']):.2f})")
        best = min((r for r in records if (r.family, r.seed) == key and r.multiplier < 0),
                   key=lambda r: r.final_test)
        ax.axhline(best.lrs[0], color="grey", linestyle=":", linewidth=1, label="oracle's grid LR")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("LR")
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    start = "the tuned LR" if tuned else "the usual LR"
    fig.suptitle(f"LR per epoch from {start}, seed {seed} (in brackets: final test loss / the oracle's)", fontsize=11)
    fig.savefig(path, dpi=80)


def check_path(parser: argparse.ArgumentParser, option: str, path: Path | None) -> None:
    """Refuse an output path that could not be written after the runs: a directory, or a path in a missing or
    read-only directory."""
    if path is None:
        return
    if path.is_dir():
        parser.error(f"{option}: {path} is a directory; give a file path")
    if not path.parent.is_dir():
        parser.error(f"{option}: the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        parser.error(f"{option}: the directory {path.parent} is not writable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per scenario (default 5)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, each run once (default: all six)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write every run's result here (JSON)")
    parser.add_argument("--tables", type=Path, default=None, metavar="JSON",
                        help="print the tables of a saved --out file instead of running anything")
    parser.add_argument("--from-tuned", action="store_true",
                        help="start every schedule at the grid LR with the lowest final validation loss instead of "
                             "x0.1/x1/x10 (cosine from it: the grid run itself; policy_capped: max_lr = that LR)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="also draw each scenario's LR per epoch (seed 0) under the policy and two fixed schedules")
    args = parser.parse_args()
    if args.tables is not None:
        try:
            saved = json.loads(args.tables.read_text())
            records, seeds = [RunRecord(**r) for r in saved["records"]], saved["seeds"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(f"--tables: {args.tables} is no saved --out file ({type(err).__name__}: {err})")
        if not records:
            parser.error(f"--tables: {args.tables} is no saved --out file (it holds no records)")
        check_path(parser, "--plot", args.plot)
        print(f"final test loss / the best cosine run over the LR grid; mean ± std over {seeds} seed(s)\n")
        print(tuned_tables(records) if saved.get("from_tuned") else tables(records))
        if args.plot is not None:
            plot(records, args.plot)
        return
    check_path(parser, "--out", args.out)
    check_path(parser, "--plot", args.plot)
    names = list(dict.fromkeys(n.strip() for n in args.scenarios.split(",") if n.strip()))  # each once
    if unknown := [n for n in names if n not in SCENARIOS]:
        parser.error(f"--scenarios: unknown {unknown}; known: {', '.join(SCENARIOS)}")
    if args.seeds < 1 or (args.workers is not None and args.workers < 1):
        parser.error("--seeds and --workers must be >= 1")
    if not names:
        parser.error("--scenarios: none given")
    from tqdm import tqdm

    with make_pool(args.workers) as pool:
        if args.from_tuned:  # the grid first: it picks each start
            todo = grid_jobs(names, args.seeds)
            records = list(tqdm(pool.map(run, todo), total=len(todo), desc="grid", unit="run"))
            todo = tuned_jobs(records)
            records += list(tqdm(pool.map(run, todo), total=len(todo), desc="from the tuned LR", unit="run"))
        else:
            todo = jobs(names, args.seeds)
            records = list(tqdm(pool.map(run, todo), total=len(todo), desc="runs", unit="run"))
    # the tables first: a failed write loses no result
    print(f"\nfinal test loss / the best cosine run over the LR grid; mean ± std over {args.seeds} seed(s)\n")
    print(tuned_tables(records) if args.from_tuned else tables(records))
    if args.out is not None:
        args.out.write_text(json.dumps({"seeds": args.seeds, "ratio_cap": RATIO_CAP, "from_tuned": args.from_tuned,
                                        "records": [asdict(r) for r in records]}) + "\n")
    if args.plot is not None:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
