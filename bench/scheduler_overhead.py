"""PolicyScheduler overhead: per-optimizer-step cost of its hook, and per-decision latency.

A small MLP (784-256-10, batch 128, Adam, 100 steps per epoch, synthetic MNIST-sized data) is trained
three ways, epochs interleaved so that machine noise hits all three alike:

- ``none``: no scheduler (the baseline);
- ``cosine``: ``CosineAnnealingLR``, stepped once per epoch;
- ``policy``: ``PolicyScheduler`` with the bundled policy, stepped once per epoch (its optimizer hook
  runs on every step; the decision runs once per epoch).

Step time excludes the decision; the decision (``scheduler.step(val_loss, train_loss=...)``) is timed
on its own. Targets: ≤ 2 % added step time, ≤ 0.1 ms per decision on a 2-core CPU.
Ends with two machine-readable lines: ``overhead_pct <value>`` and ``decision_ms <value>``.

Usage: ``python bench/scheduler_overhead.py [--epochs 30] [--threads 1] [--device cpu]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller import PolicyScheduler  # noqa: E402

STEPS, BATCH = 100, 128


def make(device: torch.device, kind: str) -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = None
    if kind == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    elif kind == "policy":
        sched = PolicyScheduler(opt, total_epochs=1000)
    return model, opt, sched


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch(model, opt, x, y, device) -> tuple[float, float]:
    """Returns (seconds for the epoch's steps, mean train loss)."""
    perm = torch.randperm(x.shape[0], device=device)
    total = torch.zeros((), device=device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(STEPS):
        idx = perm[i * BATCH : (i + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.detach()
    sync(device)
    return time.perf_counter() - t0, float(total) / STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="timed epochs per variant (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (STEPS * BATCH,), generator=gen).to(device)
    kinds = ("none", "cosine", "policy")
    runs = {k: make(device, k) for k in kinds}
    step_ms: dict[str, list[float]] = {k: [] for k in kinds}
    decision_ms: dict[str, list[float]] = {k: [] for k in kinds}
    for e in range(args.epochs + 2):
        for k in kinds:
            model, opt, sched = runs[k]
            seconds, train_loss = epoch(model, opt, x, y, device)
            t0 = time.perf_counter()
            if k == "policy":
                sched.step(train_loss * 1.05, train_loss=train_loss)
            elif k == "cosine":
                sched.step()
            sync(device)
            decided = time.perf_counter() - t0
            if e >= 2:  # two warm-up epochs
                step_ms[k].append(1e3 * seconds / STEPS)
                decision_ms[k].append(1e3 * decided)
    base = statistics.median(step_ms["none"])
    print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s); MLP 784-256-10, batch {BATCH}, "
          f"Adam, {STEPS} steps/epoch, median of {args.epochs} interleaved epochs\n")
    header = f"{'scheduler':10s} {'ms/step':>9s} {'vs none':>9s} {'ms/decision':>12s}"
    print(header)
    print("-" * len(header))
    for k in kinds:
        ms = statistics.median(step_ms[k])
        print(f"{k:10s} {ms:9.4f} {100 * (ms / base - 1):+8.2f}% {statistics.median(decision_ms[k]):12.4f}")
    overhead = 100 * (statistics.median(step_ms["policy"]) / base - 1)
    print(f"\noverhead_pct {overhead:.3f}")
    print(f"decision_ms {statistics.median(decision_ms['policy']):.4f}")


if __name__ == "__main__":
    main()
