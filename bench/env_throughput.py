"""Environment throughput: ms per LRControl-v0 step per family, beside a naive DataLoader loop.

For each family's default task (the middle architecture, the family's optimizer and default LR),
measures on the same thread count:

- ``env ms/step``: one ``env.step`` = set the LR, train one epoch (tensors preloaded, batches by index
  permutation, the optimizer hook on), evaluate on the validation split, build features;
- ``naive ms/epoch``: the same model trained one epoch the textbook way — a shuffling
  ``torch.utils.data.DataLoader`` over a ``TensorDataset`` — plus a DataLoader validation pass;
- inner training samples per second through the env, and the ratio naive / env.

Then the batched section (``envs.batched``): model-epochs per second for N = 8, 32, 128 runs of one
family's default task (seeds 0..N-1) through

- ``batched``: one :class:`envs.batched.LRControlVecEnv` of N slots (one batched epoch per step);
- ``separate``: N ``LRControlEnv`` in an SB3 ``DummyVecEnv`` (N epochs one after another per step);
- ``naive``: the DataLoader loop above, one model-epoch at a time.

The three are timed in interleaved rounds (one step of each per round, medians reported), so load
from other processes on a shared machine hits them alike. Budgets are long enough that no episode
ends while timing (steady state); the PPO section below includes resets. Last, end-to-end PPO
(SB3, default MlpPolicy) env-steps per second for a short run on the batchable training families,
through ``make_vec_env`` (batched) and through per-env ``LRControlEnv`` slots, with the mean inner
work per env step of each (their sampled tasks differ; a short run draws few of them). SB3 runs whole
rollouts (about 2048 env steps each, at least 8 per env), so ``--ppo-steps`` is rounded up to a multiple of
one; the steps run are printed.

Ends with the machine-readable lines ``env_step_ms_median <value>`` (median over families),
``batched_vs_separate_n32 <ratio>`` and ``batched_vs_naive_n32 <ratio>`` (model-epochs/s ratios).

Usage: ``python bench/env_throughput.py [--families a,b] [--steps 8] [--threads 1] [--device cpu]
[--batched-family digits_mlp] [--batched-n 8,32,128] [--ppo-steps 4096] [--ppo-envs 32]``
(``--families ''`` skips the per-family table, ``--ppo-steps 0`` the PPO run; ``--device auto``: CUDA when available.)
Arguments are checked before any timing: ``--batched-family`` must be one of ``envs.batched.BATCHABLE_FAMILIES``,
and a local family's data must be readable (``$LRCONTROL_DATA``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs import (  # noqa: E402
    FAMILIES,
    LOCAL_FAMILIES,
    TRAIN_FAMILIES,
    EnvConfig,
    LRControlEnv,
    build_task,
    check_device,
    check_local_data,
    get_family,
)
from envs.batched import (  # noqa: E402
    BATCHABLE_FAMILIES,
    BatchConfig,
    LRControlVecEnv,
    is_batchable,
    make_vec_env,
)

LONG_BUDGET = 10_000
"""Epoch budget of the timed tasks: no episode ends while timing."""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def naive_epoch(family: str, device: str = "cpu"):
    """One textbook epoch of the family's default task: a shuffling DataLoader over CPU tensors, each
    batch moved to ``device``, then a DataLoader validation pass. Returns the epoch as a callable."""
    task = build_task(get_family(family).default_task(seed=0), device)
    cpu = task.data.to(torch.device("cpu"))
    model, opt = task.model, task.optimizer
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(cpu.x_train, cpu.y_train), batch_size=task.config.batch_size, shuffle=True
    )
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(cpu.x_val, cpu.y_val), batch_size=256)

    def epoch() -> None:
        model.train()
        for xb, yb in train:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            task.loss(model(xb), yb).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            sum(task.loss(model(xb.to(device)), yb.to(device)).item() * len(xb) for xb, yb in val)

    return epoch


def naive_epoch_ms(family: str, steps: int) -> float:
    epoch = naive_epoch(family)
    epoch()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def batched_row(family: str, n: int, steps: int, device: str) -> tuple[float, float, float]:
    """Model-epochs per second: (batched VecEnv, separate envs, naive loop), timed in interleaved rounds."""
    config = EnvConfig(families=(family,), num_threads=None, device=device)
    base = replace(get_family(family).default_task(seed=0), epochs=LONG_BUDGET)
    options = [{"task": replace(base, seed=seed)} for seed in range(n)]
    batched = LRControlVecEnv(n, config, BatchConfig(reshape_every=None))
    separate = DummyVecEnv([lambda: LRControlEnv(config) for _ in range(n)])
    for venv in (batched, separate):
        venv.set_options(options)
        venv.reset()
    naive = naive_epoch(family, device)
    actions = np.zeros((n, 1), dtype=np.float32)
    timers = {
        "batched": lambda: batched.step(actions),
        "separate": lambda: separate.step(actions),
        "naive": naive,
    }
    times: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(steps + 1):  # round 0 warms up
        for name, fn in timers.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if round_:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    batched.close()
    separate.close()
    return n / med["batched"], n / med["separate"], 1.0 / med["naive"]


@functools.lru_cache(maxsize=None)
def _task_work(family: str, width: int, depth: int) -> float:
    """Inner work of one epoch, in training samples × model parameters (∝ FLOPs of an MLP epoch)."""
    fam = get_family(family)
    n_params = sum(p.numel() for p in fam.model(width, depth).parameters())
    return float(fam.data().x_train.shape[0] * n_params)


class _WorkMeter(BaseCallback):
    """Sums the inner work of every env step PPO takes (the tasks differ between the two runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.work = 0.0

    def _on_step(self) -> bool:
        for episode in self.training_env.get_attr("episode"):
            task = episode.task
            self.work += _task_work(task.family, task.width, task.depth)
        return True


def ppo_n_steps(n_envs: int) -> int:
    """PPO's rollout length per env: a rollout of about 2048 env steps over ``n_envs`` envs (at least 8 each)."""
    return max(2048 // n_envs, 8)


def ppo_steps_run(requested: int, n_envs: int) -> int:
    """The env steps a PPO run of ``requested`` steps takes: SB3 collects whole rollouts of
    ``ppo_n_steps(n_envs) × n_envs`` steps, so the count is rounded up to a multiple of that."""
    rollout = ppo_n_steps(n_envs) * n_envs
    return -(-requested // rollout) * rollout


def ppo_env_steps_per_s(batched: bool, n_envs: int, total_steps: int,
                        device: str) -> tuple[float, float, int, int]:
    """End-to-end PPO on the batchable training families, batched or per-env.

    Returns env-steps/s, mean inner work per env step (samples × parameters), episodes ended and the env steps
    run (``total_steps`` rounded up to whole rollouts: :func:`ppo_steps_run`).
    A short run draws few tasks, so the batched side mixes shapes (batches of 8, a new shape every
    32 epochs) and the work per step is reported to show how alike the two runs' tasks were.
    """
    families = tuple(f for f in TRAIN_FAMILIES if is_batchable(f))
    config = EnvConfig(families=families, num_threads=None, device=device)
    if batched:
        venv = make_vec_env(families, n_envs, config, seed=0, batch_config=BatchConfig(runs_per_batch=8,
                                                                                        reshape_every=32))
    else:
        venv = VecMonitor(DummyVecEnv([lambda: LRControlEnv(config) for _ in range(n_envs)]))
        venv.seed(0)
    model = PPO("MlpPolicy", venv, n_steps=ppo_n_steps(n_envs), batch_size=256, n_epochs=4, seed=0, device="cpu")
    meter = _WorkMeter()
    t0 = time.perf_counter()
    model.learn(total_timesteps=total_steps, callback=meter)
    elapsed = time.perf_counter() - t0
    venv.close()
    assert isinstance(venv, VecMonitor)
    return (model.num_timesteps / elapsed, meter.work / model.num_timesteps, venv.episode_count,
            model.num_timesteps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(f for f in FAMILIES if f not in LOCAL_FAMILIES),
                        help="comma-separated families (default: all but the local ones, which read $LRCONTROL_DATA)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per family / per N (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every loop")
    parser.add_argument("--device", default="cpu",
                        help="device of the batched section and PPO runs (cpu, cuda, cuda:N, auto)")
    parser.add_argument("--batched-family", default="digits_mlp", help="family of the batched section")
    parser.add_argument("--batched-n", default="8,32,128", help="comma-separated N (32 is always measured)")
    parser.add_argument("--ppo-steps", type=int, default=4096,
                        help="env steps of each PPO run, rounded up to whole rollouts (0: skip)")
    parser.add_argument("--ppo-envs", type=int, default=32, help="parallel envs of the PPO runs")
    args = parser.parse_args()
    for name in ("steps", "threads", "ppo_envs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ppo_steps < 0:
        parser.error(f"--ppo-steps must be >= 0, got {args.ppo_steps}")
    try:
        ns = sorted({int(n) for n in args.batched_n.split(",") if n} | {32})
        families = [f for f in args.families.split(",") if f]
        for family in (*families, args.batched_family):
            get_family(family)
        # before the per-family table: a missing GPU is named at once, not minutes later; "auto" resolved
        device = str(check_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    if not is_batchable(args.batched_family):
        parser.error(f"--batched-family {args.batched_family!r} is not batchable; batchable: "
                     f"{', '.join(BATCHABLE_FAMILIES)}")
    if ns[0] < 1:
        parser.error(f"--batched-n takes positive sizes, got {args.batched_n!r}")
    try:  # read now: missing local data is an argument error before any timing, not a traceback after the table
        check_local_data([*families, args.batched_family])
    except ValueError as err:
        parser.error(f"local data missing or unreadable:\n{err}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps\n")
    env_ms_all = []
    if families:
        print("Per family, CPU (one env, one model):")
        header = f"{'family':20s} {'env ms/step':>12s} {'samples/s':>11s} {'naive ms/epoch':>15s} {'naive/env':>10s}"
        print(header)
        print("-" * len(header))
    for family in families:
        env_ms, n_train = env_step_ms(family, args.steps)
        naive_ms = naive_epoch_ms(family, args.steps)
        env_ms_all.append(env_ms)
        print(f"{family:20s} {env_ms:12.2f} {n_train / env_ms * 1e3:11.0f} {naive_ms:15.2f} {naive_ms / env_ms:9.2f}x")

    print(f"\nBatched ({args.batched_family} default task, device {device}): model-epochs per second")
    header = (f"{'N':>5s} {'batched':>10s} {'separate':>10s} {'naive':>8s} "
              f"{'batched/separate':>17s} {'batched/naive':>14s}")
    print(header)
    print("-" * len(header))
    ratios: dict[int, tuple[float, float]] = {}
    for n in ns:
        b, sep, naive = batched_row(args.batched_family, n, args.steps, device)
        ratios[n] = (b / sep, b / naive)
        print(f"{n:5d} {b:10.1f} {sep:10.1f} {naive:8.1f} {b / sep:16.2f}x {b / naive:13.2f}x", flush=True)

    if args.ppo_steps:
        steps = ppo_steps_run(args.ppo_steps, args.ppo_envs)
        rounded = (f" ({args.ppo_steps} asked, rounded up to whole PPO rollouts of {ppo_n_steps(args.ppo_envs)} "
                   f"steps x {args.ppo_envs} envs)" if steps != args.ppo_steps else "")
        print(f"\nEnd-to-end PPO, {args.ppo_envs} envs, {steps} env steps{rounded}, batchable training families:")
        print(f"  {'':24s} {'env-steps/s':>11s} {'work/step':>10s} {'episodes':>9s} {'env steps':>9s}"
              "   (work: M samples x params)")
        rates = {}
        for batched in (True, False):
            rate, work, episodes, run = ppo_env_steps_per_s(batched, args.ppo_envs, args.ppo_steps, device)
            rates[batched] = (rate, work)
            name = "batched (make_vec_env)" if batched else "per-env (DummyVecEnv)"
            print(f"  {name:24s} {rate:11.1f} {work / 1e6:10.1f} {episodes:9d} {run:9d}", flush=True)
        (rb, wb), (rs, ws) = rates[True], rates[False]
        print(f"  batched / per-env: {rb / rs:.2f}x env-steps/s, {rb * wb / (rs * ws):.2f}x inner work/s")

    if env_ms_all:
        print(f"\nenv_step_ms_median {statistics.median(env_ms_all):.3f}")
    print(f"batched_vs_separate_n32 {ratios[32][0]:.3f}")
    print(f"batched_vs_naive_n32 {ratios[32][1]:.3f}")


if __name__ == "__main__":
    main()
