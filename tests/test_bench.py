"""The bench scripts: they run and print their machine-readable lines, and refuse bad arguments before timing.
No timing is asserted (machines here are shared and noisy)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300,
                          env=env)


def load(script: str, monkeypatch) -> ModuleType:
    """A bench script imported in this process (to stand in for its long parts)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, BENCH / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def assert_printed_quotient(quotient: str, a: str, b: str, scale: float = 1.0) -> None:
    """``quotient`` is ``scale * a / b`` as the script prints them: the exact quotient of any two numbers that round to
    the printed ``a`` and ``b`` lies in an interval, and the printed quotient within its own rounding of it."""
    def half_unit(text: str) -> float:  # how far rounding to the printed decimals moved a number, at most
        return 0.5 * 10.0 ** -len(text.partition(".")[2])

    q, x, y = float(quotient.rstrip("x")), float(a), float(b)
    below = y - half_unit(b)  # b printed as 0: the quotient has no upper bound
    lo = scale * (x - half_unit(a)) / (y + half_unit(b))
    hi = scale * (x + half_unit(a)) / below if below > 0 else math.inf
    slack = half_unit(quotient.rstrip("x")) + 1e-12
    assert lo - slack <= q <= hi + slack, (quotient, a, b, lo, hi)


def test_scheduler_overhead_prints_its_machine_readable_lines():
    result = run("scheduler_overhead.py", "--epochs", "1", "--parts", "1")
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("where a decision right after an epoch goes")[1].splitlines()
    rows = section[section.index(next(line for line in section if line.startswith("---"))) + 1:][:9]
    names = ("scheduler.step (the decision)", "hook.collect", "features.observe", "policy.act", "actions.next_lr",
             "np.dot", "np.tanh", "torch.zeros(3)", "an empty Python call")
    assert [row.strip().startswith(name) for row, name in zip(rows, names)] == [True] * 9, rows
    assert all(float(row.split()[-1]) > 0 and float(row.split()[-2]) > 0 for row in rows)  # cold, then warm
    keys = [line.split()[0] for line in result.stdout.splitlines()[-5:]]
    assert keys == ["overhead_pct", "overhead_pct_raw", "decision_ms", "decision_ms_warm", "decision_vs_cosine"]
    assert all(float(line.split()[1]) == float(line.split()[1]) for line in result.stdout.splitlines()[-5:])  # no NaN
    # the machine-readable lines say what the table says (no timing asserted: only how the numbers relate)
    line = {row.split()[0]: row.split()[1] for row in result.stdout.splitlines()[-5:]}
    table = {row.split()[0]: row.split() for row in result.stdout.splitlines()
             if row.split()[:1] in (["none"], ["cosine"], ["policy"])}
    base, hook, decision, warm = table["none"][1], table["policy"][3], table["policy"][4], table["policy"][5]
    assert (line["decision_ms"], line["decision_ms_warm"]) == (decision, warm)  # right after an epoch, then warm
    assert_printed_quotient(line["decision_vs_cosine"], decision, table["cosine"][4])
    assert_printed_quotient(line["overhead_pct_raw"], hook, base, scale=100)  # the hook's time over the baseline
    assert 0 < float(hook) < float(table["policy"][1])  # per step: the hook runs inside the step it is part of
    assert float(line["overhead_pct"]) < float(line["overhead_pct_raw"])  # net of the empty timed window's cost


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("scheduler_overhead.py", ["--epochs", "0"], "--epochs must be >= 1"),
        ("scheduler_overhead.py", ["--parts", "-1"], "--parts must be >= 0"),
        ("scheduler_overhead.py", ["--device", "bogus"], "unknown device 'bogus'"),
        ("scheduler_overhead.py", ["--device", "mps"], "device 'mps' is not supported"),
        ("env_throughput.py", ["--steps", "0"], "--steps must be >= 1"),
        ("env_throughput.py", ["--batched-n", "0"], "--batched-n takes positive sizes"),
        ("env_throughput.py", ["--families", "nope"], "unknown task family 'nope'"),
        ("env_throughput.py", ["--device", "cuda:99"], "'cuda:99' is not available"),
        ("env_throughput.py", ["--families", "blobs_mlp", "--steps", "1", "--ppo-steps", "0",
                               "--batched-family", "wine_mlp"], "--batched-family 'wine_mlp' is not batchable"),
    ],
)
def test_bad_arguments_are_refused_before_any_timing(script, args, message):
    result = run(script, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""  # nothing timed, no table started


def test_env_throughput_refuses_a_local_family_without_its_data_before_any_timing(tmp_path):
    env = {**os.environ, "LRCONTROL_DATA": str(tmp_path)}  # an empty root: no MNIST under it
    result = run("env_throughput.py", "--families", "blobs_mlp,mnist_mlp", "--steps", "1", "--ppo-steps", "0", env=env)
    assert result.returncode == 2 and "mnist_mlp: mnist: none of" in result.stderr, result.stderr
    assert result.stdout == ""


def test_env_throughput_runs_on_the_device_auto_resolves_to_and_its_last_lines_say_what_its_tables_say():
    from envs import check_device

    result = run("env_throughput.py", "--families", "blobs_mlp,wine_mlp,moons_mlp", "--steps", "1", "--batched-n", "32",
                 "--ppo-steps", "0", "--device", "auto")
    assert result.returncode == 0, result.stderr
    assert f"device {check_device('auto')})" in result.stdout
    lines = result.stdout.splitlines()
    keys = [line.split()[0] for line in lines[-3:]]
    assert keys == ["env_step_ms_median", "batched_vs_separate_n32", "batched_vs_naive_n32"]
    # the machine-readable lines say what the tables say (no timing asserted: only how the numbers relate)
    close = 0.0055 + 1e-9  # a machine line prints 3 decimals of what a table cell prints with 2
    value = {line.split()[0]: float(line.split()[1]) for line in lines[-3:]}
    families = {row.split()[0]: row.split()[1:] for row in lines
                if row.split()[:1] in (["blobs_mlp"], ["wine_mlp"], ["moons_mlp"])}
    assert len(families) == 3
    for env_ms, _, naive_ms, naive_over_env in families.values():
        assert_printed_quotient(naive_over_env, naive_ms, env_ms)
    assert value["env_step_ms_median"] == pytest.approx(sorted(float(r[0]) for r in families.values())[1], abs=close)
    row_32 = next(row for row in lines if row.split()[:1] == ["32"])
    _, batched, separate, naive, over_separate, over_naive = row_32.split()
    assert value["batched_vs_separate_n32"] == pytest.approx(float(over_separate.rstrip("x")), abs=close)
    assert value["batched_vs_naive_n32"] == pytest.approx(float(over_naive.rstrip("x")), abs=close)
    assert_printed_quotient(over_separate, batched, separate)
    assert_printed_quotient(over_naive, batched, naive)


def test_env_throughput_prints_the_ppo_steps_run_whole_rollouts_and_all(monkeypatch, capsys):
    """SB3 runs whole rollouts of n_steps x n_envs env steps: the header names the steps run, not those asked."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    et = load("env_throughput.py", monkeypatch)
    venv = DummyVecEnv([lambda: gym.make("CartPole-v1") for _ in range(32)])  # what SB3 does, on a cheap env
    model = PPO("MlpPolicy", venv, n_steps=et.ppo_n_steps(32), batch_size=256, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=100)
    assert model.num_timesteps == et.ppo_steps_run(100, 32) == 2048
    assert et.ppo_steps_run(2048, 32) == 2048 and et.ppo_steps_run(2049, 32) == 4096

    monkeypatch.setattr(et, "batched_row", lambda family, n, steps, device: (2.0, 1.0, 1.0))
    monkeypatch.setattr(et, "ppo_env_steps_per_s", lambda batched, n_envs, steps, device: (
        10.0, 1e6, 3, et.ppo_steps_run(steps, n_envs)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this process's threads stay as they are
    monkeypatch.setattr(sys, "argv", ["env_throughput.py", "--families", "", "--batched-n", "32", "--ppo-steps", "100"])
    et.main()
    out = capsys.readouterr().out
    assert "End-to-end PPO, 32 envs, 2048 env steps (100 asked, rounded up to whole PPO rollouts of 64 steps x 32 " \
           "envs)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("batched (", "per-env ("))]
    assert len(rows) == 2 and all(row[-1] == "2048" for row in rows)
