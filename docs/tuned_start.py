"""What the bundled policy costs when the initial LR is already tuned, and what ``max_lr`` = that LR changes.

The evaluation of ``train_controller.py evaluate`` starts every schedule at x0.1, x1 and x10 a family's default LR.
A practitioner who has tuned the LR starts elsewhere: here, at the point of the oracle's 7-LR cosine grid
(``envs.evaluation.ORACLE_GRID``) with the lowest final *validation* loss, what a grid search on the validation set
picks. From that LR run: cosine annealing (the grid run itself), constant, OneCycle, ReduceLROnPlateau
(``envs.evaluation.make_baseline``), the policy, and the policy with ``max_lr`` set to that LR (``policy_capped``: it
can only lower the LR). Score as in the model card: final test loss / the best final test loss over the grid, capped at
``RATIO_CAP``; per seed, the geometric mean over families, reported as mean +- std over seeds, then each family's mean
over seeds. Tasks are ``envs.evaluation.evaluation_tasks`` (the model card's), on the validation families by default.

    python docs/tuned_start.py                          # validation families, 5 seeds: ~10 min on 2 cores
    python docs/tuned_start.py --families blobs_mlp --seeds 1 --out /tmp/t.json
    python docs/tuned_start.py --tables /tmp/t.json     # the table again, from the saved runs

``--out`` is checked before anything runs (its directory must exist), and the table is printed before it is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from dataclasses import replace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
from controller import load_policy  # noqa: E402
from envs import FAMILIES, VALIDATION_FAMILIES  # noqa: E402
from envs.evaluation import (  # noqa: E402
    ORACLE_GRID,
    Evaluation,
    Job,
    evaluation_tasks,
    grid_search_picks,
    make_pool,
    oracle_losses,
    run_jobs,
)
from outside_suite import check_path  # noqa: E402  (this directory is the script's: sys.path[0])

SCHEDULES = ("policy", "policy_capped", "constant", "cosine", "onecycle", "plateau")
"""``policy_capped``: the policy with ``max_lr`` = the tuned LR."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(VALIDATION_FAMILIES),
                        help="comma-separated, each run once (default: validation)")
    parser.add_argument("--seeds", type=int, default=5, help="tasks per family (default 5)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the evaluation here (JSON: envs.evaluation.Evaluation's, with each tuned LR)")
    parser.add_argument("--tables", type=Path, default=None, metavar="JSON",
                        help="print the table of a saved --out file instead of running anything")
    args = parser.parse_args()
    if args.tables is not None:
        try:
            saved = json.loads(args.tables.read_text())
            if not isinstance(saved, dict) or "tuned_lr" not in saved:
                raise ValueError("no 'tuned_lr': not written by tuned_start.py --out")
            ev = Evaluation.from_dict(saved)
        except (OSError, ValueError) as err:
            parser.error(f"--tables: {args.tables} is no saved --out file ({err})")
        print(table(ev))
        return
    check_path(parser, "--out", args.out)
    families = list(dict.fromkeys(f.strip() for f in args.families.split(",") if f.strip()))  # each once
    if not families or (unknown := [f for f in families if f not in FAMILIES]):
        parser.error(f"--families: unknown {unknown if families else 'none given'}; known: {', '.join(FAMILIES)}")
    if args.seeds < 1 or (args.workers is not None and args.workers < 1):
        parser.error("--seeds and --workers must be >= 1")
    from tqdm import tqdm

    policy = load_policy(None)
    grid_jobs = [Job(task, "cosine", None, i, -m) for f in families for m in ORACLE_GRID
                 for i, task in enumerate(evaluation_tasks(f, args.seeds, m))]  # one draw, 7 LRs
    with make_pool(args.workers) as pool:
        with tqdm(total=len(grid_jobs), desc="grid", unit="run") as bar:
            grid = run_jobs(grid_jobs, pool, bar.update)
        tuned = grid_search_picks(grid)
        task_of = {(job.task.family, job.seed_index): job.task for job in grid_jobs if job.multiplier == -1.0}
        labels = [(key, s) for key in tuned for s in SCHEDULES if s != "cosine"]
        starts = [Job(task_of[key].with_lr(tuned[key].lrs[0]), "policy" if s.startswith("policy") else s,
                      policy if s.startswith("policy") else None, key[1], 1.0,
                      policy_options={"max_lr": tuned[key].lrs[0]} if s == "policy_capped" else None)
                  for key, s in labels]
        with tqdm(total=len(starts), desc="from the tuned LR", unit="run") as bar:
            done = [replace(r, schedule=s) for r, (_, s) in zip(run_jobs(starts, pool, bar.update), labels)]
    records = done + [replace(r, multiplier=1.0) for r in tuned.values()]  # cosine from the tuned LR: the grid run
    ev = Evaluation(families, args.seeds, [1.0], list(SCHEDULES), records, oracle_losses(grid))
    print(table(ev))  # before the file: a failed write loses no result
    if args.out is not None:
        tuned_lrs = {f"{f}/{i}": r.lrs[0] for (f, i), r in tuned.items()}
        args.out.write_text(json.dumps({**ev.to_dict(), "tuned_lr": tuned_lrs}) + "\n")


def table(ev: Evaluation) -> str:
    """Markdown: per schedule, the geometric mean over families (mean ± std over seeds), then each family's mean."""
    lines = [f"\nfrom the tuned LR: final test loss / the best cosine run over the LR grid; mean ± std over {ev.seeds} "
             "seed(s) of the geometric mean over families\n",
             "| schedule | from the tuned LR | " + " | ".join(ev.families) + " |",
             "|---|---|" + "---|" * len(ev.families)]
    for s in ev.schedules:
        mean, std = ev.aggregate(s, 1.0)
        cells = [f"{ev.aggregate(s, 1.0, f)[0]:.2f}" for f in ev.families]
        lines.append(f"| {s} | {mean:.3f} ± {std:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
