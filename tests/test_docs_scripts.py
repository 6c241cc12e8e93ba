"""The scripts under docs/ that make the README's picture and the model card's check outside the suite: they run as
their docstrings say, on real training runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCS / script), *args], capture_output=True, text=True, timeout=300)


def load(script: str, monkeypatch):
    """A docs script imported in this process (its dataclasses look their module up in ``sys.modules``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(script).stem, DOCS / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def suite(monkeypatch):
    """docs/outside_suite.py imported in this process; its runs leave this process's torch threads as they are."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    return load("outside_suite.py", monkeypatch)


def test_history_plot_draws_a_real_run(tmp_path):
    out = tmp_path / "history.png"
    result = run("make_history_plot.py", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outside_suite_runs_every_schedule_and_the_oracle(tmp_path):
    out = tmp_path / "outside.json"
    result = run("outside_suite.py", "--seeds", "1", "--scenarios", "iris_fullbatch", "--workers", "1",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())["records"]
    oracle = [r for r in records if r["multiplier"] < 0]
    assert sorted(-r["multiplier"] for r in oracle) == sorted(3.0**k for k in range(-3, 4))
    runs = {(r["multiplier"], r["schedule"]): r for r in records if r["multiplier"] > 0}
    schedules = ("policy", "policy_no_acc", "constant", "cosine", "onecycle", "plateau")
    assert set(runs) == {(m, s) for m in (0.1, 1.0, 10.0) for s in schedules}
    assert all(len(r["lrs"]) == 100 for r in records)  # iris: 100 epochs, none diverged
    for m in (0.1, 1.0, 10.0):
        assert len(set(runs[m, "constant"]["lrs"])) == 1
        assert len(set(runs[m, "policy"]["lrs"])) > 1  # the policy decided (full batch: one optimizer step an epoch)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| iris_fullbatch")]
    assert len(rows) == 3 and all(row.count("±") == len(schedules) for row in rows)
    summary = [line for line in result.stdout.splitlines() if line.startswith("| policy")]
    assert len(summary) == 2 and all(line.count("±") == 3 for line in summary)  # policy, policy_no_acc at x0.1/x1/x10
    png = tmp_path / "lrs.png"  # the tables again from the saved file, no training, and the LR paths drawn
    reprinted = run("outside_suite.py", "--tables", str(out), "--plot", str(png))
    assert reprinted.returncode == 0 and reprinted.stdout.strip() in result.stdout, reprinted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outside_suite_from_tuned_starts_every_schedule_at_the_grid_lr_the_validation_loss_picks(tmp_path):
    out = tmp_path / "tuned.json"
    result = run("outside_suite.py", "--from-tuned", "--seeds", "1", "--scenarios", "iris_fullbatch", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())["records"]
    grid = [r for r in records if r["multiplier"] < 0]
    assert len(grid) == 7 and not any(r["diverged"] for r in grid)
    tuned = min(grid, key=lambda r: r["final_val"])
    runs = {r["schedule"]: r for r in records if r["multiplier"] > 0}
    assert set(runs) == {"policy_no_acc", "policy_capped", "constant", "onecycle", "plateau"}  # cosine: `tuned`
    assert all(r["multiplier"] == -tuned["multiplier"] for r in runs.values())
    start = tuned["lrs"][0]
    assert all(r["lrs"][0] == start for s, r in runs.items() if s != "onecycle")
    assert max(runs["onecycle"]["lrs"]) == pytest.approx(start)  # its peak: it starts lower
    assert max(runs["policy_capped"]["lrs"]) <= start < max(runs["policy_no_acc"]["lrs"])  # the cap held; free, it rose
    cosine = tuned["final_test"] / min(r["final_test"] for r in grid)
    assert f"| cosine | {cosine:.2f} ± 0.00 |" in result.stdout.replace("**", "")
    png = tmp_path / "tuned.png"
    reprinted = run("outside_suite.py", "--tables", str(out), "--plot", str(png))
    assert reprinted.returncode == 0 and reprinted.stdout.strip() in result.stdout, reprinted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outside_suite_tables_score_against_the_grid_and_let_a_regression_policy_stand_for_both(monkeypatch):
    """The tables from records alone (no training): ratios to the best grid run, the geometric mean over scenarios per
    seed, and on a regression (no accuracy either way) the policy's run standing for ``policy_no_acc`` too."""
    import importlib.util

    from envs.evaluation import MULTIPLIERS, RunRecord

    spec = importlib.util.spec_from_file_location("outside_suite", DOCS / "outside_suite.py")
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "outside_suite", suite)  # its dataclasses look their module up
    spec.loader.exec_module(suite)
    records = []
    for seed, best in enumerate((1.0, 2.0)):
        for name, scale in (("regression_large_scale", 1.0), ("rmsprop", 4.0)):
            records += [RunRecord(name, seed, -g, "cosine", final_test=scale * best * g) for g in (1.0, 3.0)]
            records += [RunRecord(name, seed, m, s, final_test=scale * best * (1.5 if s.startswith("policy") else 2.0))
                        for m in MULTIPLIERS for s in suite.SCHEDULES
                        if not (s == "policy_no_acc" and name == "regression_large_scale")]
    text = suite.tables(records)
    assert "| policy | **1.50 ± 0.00** | **1.50 ± 0.00** | **1.50 ± 0.00** |" in text
    assert "| constant | 2.00 ± 0.00 | 2.00 ± 0.00 | 2.00 ± 0.00 |" in text
    assert "| regression_large_scale | ×1 | **1.50 ± 0.00** | **1.50 ± 0.00** | 2.00 ± 0.00 |" in text


@pytest.mark.parametrize("script", ["outside_suite.py", "tuned_start.py"])
def test_a_docs_script_refuses_a_file_that_is_no_saved_run(tmp_path, script):
    bad = tmp_path / "bad.json"
    bad.write_text('{"records": 1}')
    result = run(script, "--tables", str(bad))
    assert result.returncode == 2 and f"--tables: {bad} is no saved --out file (" in result.stderr


@pytest.mark.parametrize("script, reason",
                         [("outside_suite.py", "it holds no records"), ("tuned_start.py", "tuned_lr")])
def test_a_docs_script_refuses_a_saved_file_it_cannot_tabulate(tmp_path, script, reason):
    """An --out file of no runs, or (tuned_start) ``train_controller.py evaluate``'s evaluation.json: no tuned LR."""
    from envs.evaluation import Evaluation, RunRecord

    bad = tmp_path / "bad.json"
    if script == "outside_suite.py":
        bad.write_text(json.dumps({"seeds": 1, "ratio_cap": 10.0, "from_tuned": False, "records": []}))
    else:
        records = [RunRecord("blobs_mlp", 0, 1.0, s, lrs=[0.1], final_test=0.5, final_val=0.5, initial_test=2.0)
                   for s in ("policy", "cosine")]
        ev = Evaluation(["blobs_mlp"], 1, [1.0], ["policy", "cosine"], records, {"blobs_mlp/0": 0.4})
        bad.write_text(json.dumps(ev.to_dict()))
    result = run(script, "--tables", str(bad))
    assert result.returncode == 2 and f"--tables: {bad} is no saved --out file (" in result.stderr, result.stderr
    assert reason in result.stderr and result.stdout == ""


@pytest.mark.parametrize("script, args", [
    ("outside_suite.py", ["--seeds", "1", "--scenarios", "iris_fullbatch", "--workers", "1"]),
    ("tuned_start.py", ["--seeds", "1", "--families", "blobs_mlp", "--workers", "1"]),
])
@pytest.mark.parametrize("where", ["missing directory", "directory"])
def test_a_docs_script_refuses_an_out_it_could_not_write_before_running_anything(tmp_path, script, args, where):
    out = tmp_path / "missing" / "out.json" if where == "missing directory" else tmp_path
    result = run(script, *args, "--out", str(out))
    message = f"--out: the directory {out.parent} does not exist" if where == "missing directory" else (
        f"--out: {out} is a directory")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == "" and "it/s" not in result.stderr and "run/s" not in result.stderr  # nothing ran


def test_a_docs_script_runs_a_repeated_name_once(monkeypatch, capsys):
    """``--scenarios a,a`` / ``--families a,a``: the runs of ``a`` once (the runs stand in here: no training)."""
    from envs.evaluation import RunRecord

    class Pool:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, items):
            return map(fn, items)

    runs: list[tuple] = []

    def fake_run(job):  # outside_suite: (scenario, seed, multiplier, schedule)
        runs.append(job)
        name, seed, m, s = job
        return RunRecord(name, seed, m, s, lrs=[1e-3], final_test=1.0, final_val=1.0 + abs(m) / 10)

    def fake_jobs(jobs, pool=None, progress=None):  # tuned_start: envs.evaluation.Job
        runs.extend((j.task.family, j.seed_index, j.multiplier, j.schedule) for j in jobs)
        return [RunRecord(j.task.family, j.seed_index, j.multiplier, j.schedule, lrs=[j.task.lr], final_test=1.0,
                          final_val=1.0 + abs(j.multiplier) / 10) for j in jobs]

    suite, tuned = load("outside_suite.py", monkeypatch), load("tuned_start.py", monkeypatch)
    monkeypatch.setattr(suite, "run", fake_run)
    monkeypatch.setattr(suite, "make_pool", lambda workers=None: Pool())
    monkeypatch.setattr(tuned, "run_jobs", fake_jobs)
    monkeypatch.setattr(tuned, "make_pool", lambda workers=None: Pool())
    for module, option, name in ((suite, "--scenarios", "iris_fullbatch"), (tuned, "--families", "blobs_mlp")):
        done, printed = [], []
        for names in (name, f"{name},{name}"):
            runs.clear()
            monkeypatch.setattr(sys, "argv", ["x", "--seeds", "1", option, names])
            module.main()
            done.append(sorted(runs))
            printed.append(capsys.readouterr().out)
        assert done[0] == done[1], (option, len(done[0]), len(done[1]))
        assert printed[0] == printed[1] and name in printed[0]  # tuned_start: the family's column once


@pytest.mark.parametrize("args, message", [
    (["--epochs", "1"], "--epochs must be >= 2, got 1"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--policy", "{tmp}/none.safetensors"], "--policy: policy file not found: {tmp}/none.safetensors"),
    (["--out", "{tmp}/h.xyz"], "--out: cannot write a '.xyz' image; use one of"),
    (["--out", "{tmp}"], "--out: {tmp} is a directory"),
])
def test_history_plot_refuses_bad_arguments_before_training(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "h.png")]  # never docs/lr_history.png
    result = run("make_history_plot.py", *args, *out)
    assert result.returncode == 2 and message.format(tmp=tmp_path) in result.stderr, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_history_plot_refuses_a_policy_file_that_is_none_before_training(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a policy file")
    result = run("make_history_plot.py", "--policy", str(bad), "--out", str(tmp_path / "h.png"))
    message = f"--policy: {bad} is not a usable lrcontrol policy file"
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "" and not (tmp_path / "h.png").exists()


def test_outside_suite_standardises_each_split_with_the_training_part_alone(suite):
    """No statistic of the validation or test samples leaks into the features the runs train on."""
    (x, _), (x_val, _), (x_test, _) = suite.splits("circles_plain_sgd", 0)
    assert x.mean(0).abs().max() < 1e-5 and (x.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert len(x) + len(x_val) + len(x_test) == 1500 and len(x_test) == 300
    assert (x_test.mean(0).abs() > 1e-3).any()  # the held-out parts keep their own offsets


def test_outside_suite_steps_each_baseline_as_the_evaluation_protocol_does(suite):
    """Cosine once per epoch, OneCycle once per optimizer step (``envs.evaluation.make_baseline``): a scenario with
    minibatches tells them apart (iris, full batch, takes one step an epoch)."""
    from envs.evaluation import make_baseline

    name = "circles_plain_sgd"
    scenario = suite.SCENARIOS[name]
    steps = math.ceil(len(suite.splits(name, 0)[0][0]) / scenario.batch)
    assert steps > 1
    for schedule, per_epoch in (("cosine", 1), ("onecycle", steps)):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=scenario.lr)
        baseline = make_baseline(schedule, optimizer, scenario.epochs, steps)
        expected = []
        for _ in range(scenario.epochs):
            expected.append(optimizer.param_groups[0]["lr"])
            for _ in range(per_epoch):
                optimizer.step()
                baseline.step()
        record = suite.run((name, 0, 1.0, schedule))
        assert not record.diverged and record.lrs == pytest.approx(expected, rel=1e-12), schedule


def test_outside_suite_starts_every_schedule_of_a_seed_from_one_model_and_records_mean_losses(suite):
    """A seed fixes the initial weights: every schedule starts from the same model (its loss on the test split before
    training), whatever ran before in the process. The train loss recorded is the epoch's mean over its minibatches."""
    name = "circles_plain_sgd"
    _, _, (x_test, y_test) = suite.splits(name, 0)
    torch.manual_seed(0)
    with torch.no_grad():
        initial = torch.nn.functional.cross_entropy(suite.SCENARIOS[name].model()(x_test), y_test).item()
    constant = suite.run((name, 0, 1.0, "constant"))
    torch.rand(100)  # the global generator moved on: the next run starts from the same weights regardless
    plateau = suite.run((name, 0, 1.0, "plateau"))
    assert constant.initial_test == plateau.initial_test == pytest.approx(initial, rel=1e-6)
    assert constant.train_losses[0] == plateau.train_losses[0]  # the same first epoch (same LR, same batches)
    for train, val in zip(constant.train_losses, constant.val_losses):  # a mean, not a sum over ~29 minibatches
        assert abs(math.log(train / val)) < math.log(3), (train, val)
    # what a grid search reads: the last epoch's validation loss (here not the run's lowest, so the two differ)
    assert constant.final_val == constant.val_losses[-1] > min(constant.val_losses)


def test_outside_suite_plot_draws_each_schedules_lrs_and_the_oracles_starting_lr(suite, monkeypatch, tmp_path):
    """The plot from records alone (no training): each schedule's LR per epoch, its ratio to the oracle in the label,
    and the LR the oracle's best grid run started at (not where its cosine ended)."""
    from matplotlib.figure import Figure

    from envs.evaluation import RunRecord

    name = "iris_fullbatch"
    grid = [RunRecord(name, 0, -g, "cosine", lrs=[1e-3 * g, 1e-4 * g], final_test=abs(g - 3.0) + 0.5, final_val=1.0)
            for g in (1.0, 3.0, 9.0)]  # the best: x3, started at 3e-3 and annealed to 3e-4
    runs = [RunRecord(name, 0, 1.0, s, lrs=lrs, final_test=t, final_val=1.0) for s, lrs, t in (
        ("policy_no_acc", [1e-3, 2e-3, 4e-3], 0.75), ("cosine", [1e-3, 5e-4, 1e-4], 2.5), ("plateau", [1e-3] * 3, 1.0))]
    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    suite.plot(grid + runs, tmp_path / "p.png")
    ax = drawn[0].axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["policy_no_acc (1.50)"].get_ydata()) == [1e-3, 2e-3, 4e-3]
    assert list(lines["cosine (5.00)"].get_ydata()) == [1e-3, 5e-4, 1e-4]
    assert list(lines["plateau (2.00)"].get_ydata()) == [1e-3] * 3
    assert list(lines["oracle's grid LR"].get_ydata()) == [3e-3, 3e-3]


def test_outside_suite_gives_a_regression_no_separate_run_without_accuracy(suite):
    """On a regression the policy never gets an accuracy: its run stands for ``policy_no_acc`` (no second run)."""
    jobs = suite.jobs(["regression_large_scale", "rmsprop"], 1)
    assert {s for n, _, m, s in jobs if n == "regression_large_scale" and m > 0} == set(suite.SCHEDULES) - {
        "policy_no_acc"}
    assert {s for n, _, m, s in jobs if n == "rmsprop" and m > 0} == set(suite.SCHEDULES)


@pytest.mark.parametrize("script, option", [("outside_suite.py", "--scenarios"), ("tuned_start.py", "--families")])
def test_a_docs_script_refuses_an_unknown_name(script, option):
    result = run(script, option, "nope")
    assert result.returncode == 2 and f"{option}: unknown ['nope']" in result.stderr


def test_tuned_start_runs_every_schedule_from_the_grid_point_the_validation_loss_picks(tmp_path):
    from envs.evaluation import ORACLE_GRID, evaluation_tasks

    out = tmp_path / "tuned.json"
    result = run("tuned_start.py", "--families", "blobs_mlp", "--seeds", "1", "--workers", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    tuned_lr = saved["tuned_lr"]["blobs_mlp/0"]
    grid = [evaluation_tasks("blobs_mlp", 1, m)[0].lr for m in ORACLE_GRID]
    assert tuned_lr in grid
    schedules = ("policy", "policy_capped", "constant", "cosine", "onecycle", "plateau")
    runs = {r["schedule"]: r for r in saved["records"]}
    assert set(runs) == set(schedules) and all(r["multiplier"] == 1.0 for r in runs.values())  # x1 the tuned LR
    assert all(runs[s]["lrs"][0] == tuned_lr for s in schedules if s != "onecycle")  # OneCycle: a peak
    assert max(runs["onecycle"]["lrs"]) <= tuned_lr * (1 + 1e-9)
    assert max(runs["policy_capped"]["lrs"]) <= tuned_lr  # max_lr: the capped policy only lowers the LR
    # the cosine run from the tuned LR is one of the grid's: the oracle is at most its loss
    assert saved["oracle"]["blobs_mlp/0"] <= runs["cosine"]["final_test"]
    assert saved["summary"]["x1"]["cosine"]["mean"] >= 1.0
    assert len(set(runs["constant"]["lrs"])) == 1
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "±" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(schedules)
    reprinted = run("tuned_start.py", "--tables", str(out))  # the table again from the saved file, no training
    assert reprinted.returncode == 0 and reprinted.stdout.strip() in result.stdout, reprinted.stderr
