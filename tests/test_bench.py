"""The bench scripts: they run and print their machine-readable lines, and refuse bad arguments before timing.
No timing is asserted (machines here are shared and noisy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)


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
    ],
)
def test_bad_arguments_are_refused_before_any_timing(script, args, message):
    result = run(script, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""  # nothing timed, no table started
