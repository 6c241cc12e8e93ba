"""What the bundled policy costs when the initial LR is already tuned, and what ``max_lr`` = that LR changes.

The evaluation of ``train_controller.py evaluate`` starts every schedule at x0.1, x1 and x10 a family's default LR.
A practitioner who has tuned the LR starts elsewhere: here, at the point of the oracle's 7-LR cosine grid
(``envs.evaluation.ORACLE_GRID``) with the lowest final *validation* loss, what a grid search on the validation set
picks. From that LR run: cosine annealing (the grid run itself), constant, OneCycle, ReduceLROnPlateau
(``envs.evaluation.make_baseline``), the policy, and the policy with ``max_lr`` set to that LR (``policy_capped``: it can
only lower the LR). Score as in the model card: final test loss / the best final test loss over the grid, capped at
``RATIO_CAP``; per seed, the geometric mean over families, reported as mean +- std over seeds, then each family's mean
over seeds. Tasks are ``envs.evaluation.evaluation_tasks`` (the model card's), on the validation families by default.

    python docs/tuned_start.py                          # validation families, 5 seeds: ~10 min on 2 cores
    python docs/tuned_start.py --families blobs_mlp --seeds 1 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
from controller import load_policy  # noqa: E402
from envs import FAMILIES, VALIDATION_FAMILIES  # noqa: E402
from envs.evaluation import ORACLE_GRID, RunRecord, evaluation_tasks, make_pool, ratio_to, run_schedule  # noqa: E402
from envs.tasks import TaskConfig  # noqa: E402

SCHEDULES = ("policy", "policy_capped", "constant", "cosine", "onecycle", "plateau")


def run(job: tuple[TaskConfig, str]) -> RunRecord:
    """One inner run: ``(task, schedule)``; ``policy_capped`` is the policy with ``max_lr`` = the task's LR."""
    task, schedule = job
    torch.set_num_threads(1)
    if schedule.startswith("policy"):
        options = {"max_lr": task.lr} if schedule == "policy_capped" else None
        return run_schedule(task, "policy", load_policy(None), policy_options=options)
    return run_schedule(task, schedule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(VALIDATION_FAMILIES), help="comma-separated (default: validation)")
    parser.add_argument("--seeds", type=int, default=5, help="tasks per family (default 5)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write every run here (JSON)")
    args = parser.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families or (unknown := [f for f in families if f not in FAMILIES]):
        parser.error(f"--families: unknown {unknown if families else 'none given'}; known: {', '.join(FAMILIES)}")
    if args.seeds < 1 or (args.workers is not None and args.workers < 1):
        parser.error("--seeds and --workers must be >= 1")
    from tqdm import tqdm

    # the grid: each task at every grid LR under cosine annealing
    drawn = {(f, m): evaluation_tasks(f, args.seeds, m) for f in families for m in ORACLE_GRID}  # one draw, 7 LRs
    tasks = {(f, i): [drawn[f, m][i] for m in ORACLE_GRID] for f in families for i in range(args.seeds)}
    with make_pool(args.workers) as pool:
        grid_jobs = [(t, "cosine") for key in tasks for t in tasks[key]]
        grid = list(tqdm(pool.map(run, grid_jobs), total=len(grid_jobs), desc="grid", unit="run"))
        runs: dict[tuple[str, int], dict[str, Any]] = {}
        for n, key in enumerate(tasks):
            records = grid[n * len(ORACLE_GRID) : (n + 1) * len(ORACLE_GRID)]
            finite = [r for r in records if math.isfinite(r.final_val)]
            tuned = min(finite, key=lambda r: r.final_val) if finite else records[len(ORACLE_GRID) // 2]
            oracle = min((r.final_test for r in records), default=math.inf)
            runs[key] = {"oracle": oracle, "tuned_lr": tuned.lrs[0], "cosine": tuned}
        keys = [(key, s) for key in tasks for s in SCHEDULES if s != "cosine"]
        starts = [(tasks[key][0].with_lr(runs[key]["tuned_lr"]), s) for key, s in keys]
        done = list(tqdm(pool.map(run, starts), total=len(starts), desc="from the tuned LR", unit="run"))
    for (key, schedule), record in zip(keys, done):
        runs[key][schedule] = record
    ratio = {(key, s): ratio_to(runs[key][s].final_test, runs[key]["oracle"]) for key in runs for s in SCHEDULES}
    if args.out is not None:
        args.out.write_text(json.dumps({key[0] + "/" + str(key[1]): {
            "oracle": v["oracle"] if math.isfinite(v["oracle"]) else None, "tuned_lr": v["tuned_lr"],
            **{s: {"lrs": v[s].lrs, "final_test": v[s].final_test if math.isfinite(v[s].final_test) else None,
                   "ratio": ratio[key, s]} for s in SCHEDULES}} for key, v in runs.items()}) + "\n")
    print(f"\nfrom the tuned LR: final test loss / the best cosine run over the LR grid; mean ± std over {args.seeds} "
          "seed(s) of the geometric mean over families\n")
    print("| schedule | from the tuned LR | " + " | ".join(families) + " |")
    print("|---|---|" + "---|" * len(families))
    for s in SCHEDULES:
        per_seed = [math.exp(statistics.mean(math.log(ratio[(f, i), s]) for f in families)) for i in range(args.seeds)]
        spread = statistics.pstdev(per_seed)  # population std over seeds, as envs.evaluation reports
        cells = [f"{statistics.mean(ratio[(f, i), s] for i in range(args.seeds)):.2f}" for f in families]
        print(f"| {s} | {statistics.mean(per_seed):.3f} ± {spread:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
