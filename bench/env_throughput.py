"""Environment throughput: ms per LRControl-v0 step per family, beside a naive DataLoader loop.

For each family's default task (the middle architecture, the family's optimizer and default LR),
measures on the same thread count:

- ``env ms/step``: one ``env.step`` = set the LR, train one epoch (tensors preloaded, batches by index
  permutation, the optimizer hook on), evaluate on the validation split, build features;
- ``naive ms/epoch``: the same model trained one epoch the textbook way — a shuffling
  ``torch.utils.data.DataLoader`` over a ``TensorDataset`` — plus a DataLoader validation pass;
- inner training samples per second through the env, and the ratio naive / env.

Ends with the machine-readable line ``env_step_ms_median <value>`` (median over families).

Usage: ``python bench/env_throughput.py [--families a,b] [--steps 8] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import envs  # noqa: E402
from envs import FAMILIES, EnvConfig, LRControlEnv, build_task, get_family  # noqa: E402


def env_step_ms(family: str, steps: int) -> tuple[float, int]:
    env = LRControlEnv(EnvConfig(families=(family,), num_threads=None, device="cpu"))
    task = get_family(family).default_task(seed=0)
    env.reset(seed=0, options={"task": task})
    env.step(np.zeros(1, dtype=np.float32))  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        env.step(np.zeros(1, dtype=np.float32))
        times.append(time.perf_counter() - t0)
    n_train = env.run.task.data.x_train.shape[0]  # type: ignore[union-attr]
    return 1e3 * statistics.median(times), n_train


def naive_epoch_ms(family: str, steps: int) -> float:
    task = build_task(get_family(family).default_task(seed=0))
    data, model, opt = task.data, task.model, task.optimizer
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=task.config.batch_size, shuffle=True
    )
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_val, data.y_val), batch_size=256)

    def epoch() -> None:
        model.train()
        for xb, yb in train:
            opt.zero_grad()
            task.loss(model(xb), yb).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            sum(task.loss(model(xb), yb).item() * len(xb) for xb, yb in val)

    epoch()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families (default: all)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per family (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both loops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU, median of {args.steps} steps\n")
    header = f"{'family':20s} {'env ms/step':>12s} {'samples/s':>11s} {'naive ms/epoch':>15s} {'naive/env':>10s}"
    print(header)
    print("-" * len(header))
    env_ms_all = []
    for family in args.families.split(","):
        env_ms, n_train = env_step_ms(family, args.steps)
        naive_ms = naive_epoch_ms(family, args.steps)
        env_ms_all.append(env_ms)
        print(f"{family:20s} {env_ms:12.2f} {n_train / env_ms * 1e3:11.0f} {naive_ms:15.2f} {naive_ms / env_ms:9.2f}x")
    print(f"\nenv_step_ms_median {statistics.median(env_ms_all):.3f}")


if __name__ == "__main__":
    main()
