"""Does pruning find as good a stack in less time? The same search with and without a pruner.

    python benchmarks/search.py [--quick] [--trials 20] [--epochs 10] [--pruner median]
                                [--search digits_optuna]

Runs ``python train.py -m hparams_search=<search> hydra.sweeper.n_trials=N trainer.epochs=E
trainer.verbose=0 tracking.log_model=false`` twice on fresh stores, with
``hydra.sweeper.pruner=none`` and then with the pruner; the same seed and search space.
From the Optuna storage and the MLflow store it reads, per search:

- best ``val_accuracy`` (the objective) and its trial;
- total training time: the sum of the jobs' ``train_time_s`` (their ``model.fit`` wall
  time; a pruned job's covers the epochs it ran), and the whole command's wall time;
- trials pruned, epochs trained in all.

Pruning passes when its best is within 0.5 points of the unpruned best in at most 60% of the
training time. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_search(tmp: Path, search: str, trials: int, epochs: int, pruner: str) -> dict:
    uri = f"sqlite:///{tmp}/mlflow.db"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"hparams_search={search}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.pruner={pruner}",
        f"trainer.epochs={epochs}",
        "trainer.verbose=0",
        "tracking.log_model=false",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp}/sweep",
    ]
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")

    import optuna
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name=search, storage=f"sqlite:///{tmp}/optuna.db")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    jobs = [r for r in runs if "train_time_s" in r.data.metrics]
    states = [t.state.name for t in study.trials]
    return {
        "pruner": pruner,
        "best_val_accuracy": round(study.best_value, 4),
        "best_trial": study.best_trial.number,
        "train_time_s": round(sum(r.data.metrics["train_time_s"] for r in jobs), 1),
        "wall_s": round(wall, 1),
        "trials": len(states),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "epochs_trained": int(sum(r.data.metrics.get("epochs_completed", 0) for r in jobs)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 trials of 4 epochs")
    parser.add_argument("--trials", type=int, default=None, help="default 20")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.epochs (default 10)")
    parser.add_argument("--pruner", default="median", choices=["median", "hyperband"])
    parser.add_argument("--search", default="digits_optuna", help="configs/hparams_search/<name>")
    args = parser.parse_args()
    trials = args.trials or (6 if args.quick else 20)
    epochs = args.epochs or (4 if args.quick else 10)

    results = []
    for pruner in ("none", args.pruner):
        with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
            results.append(run_search(Path(tmp), args.search, trials, epochs, pruner))
    full, pruned = results

    gap = (full["best_val_accuracy"] - pruned["best_val_accuracy"]) * 100
    ratio = pruned["train_time_s"] / full["train_time_s"]
    print(f"{args.search}: {trials} trials of {epochs} epochs, {os.cpu_count()} CPU cores")
    keys = ("best_val_accuracy", "best_trial", "train_time_s", "wall_s", "pruned", "failed")
    keys += ("epochs_trained",)
    print(f"{'':<20}{'pruner=none':>14}{'pruner=' + args.pruner:>18}")
    for key in keys:
        print(f"{key:<20}{full[key]!s:>14}{pruned[key]!s:>18}")
    verdict = gap <= 0.5 and ratio <= 0.6
    print(
        f"best {gap:+.2f} pt below without pruning, in {ratio:.0%} of the training time: "
        f"{'pass' if verdict else 'FAIL'} (target: within 0.5 pt in at most 60%)"
    )
    summary = {
        "search": args.search,
        "trials": trials,
        "epochs": epochs,
        "none": full,
        args.pruner: pruned,
        "best_gap_pt": round(gap, 2),
        "train_time_ratio": round(ratio, 3),
        "pass": verdict,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
