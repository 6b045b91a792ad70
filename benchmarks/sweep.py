"""Per-job overhead of a Hydra multirun beyond the training itself, against a single run.

    python benchmarks/sweep.py [--quick] [--jobs 10] [--epochs 2] [--dataset digits]
                               [--launcher basic|fresh_process]

Runs ``python train.py -m trainer.seed=1,...,N trainer.epochs=E trainer.verbose=0
tracking.uri=sqlite:///<tmp>/mlflow.db hydra.sweep.dir=<tmp>/sweep`` (``--launcher basic``, the
default: the jobs run one after another in one process; ``fresh_process``:
``hydra/launcher=fresh_process hydra.launcher.n_jobs=1``, one after another, each in a new
process), then one plain ``python train.py`` with the same settings. Each job's
``train_time_s`` (wall time of its ``model.fit``) is read back from the MLflow store with
``mlflow.search_runs``.

- per-job overhead (multirun) = (wall time of the whole command - sum of the jobs'
  train_time_s) / N: start-up, sweep parent run and summary, and per job config/checks, data,
  run record, test evaluation, ERF, curves figure, logged model;
- where it goes, from the MLflow runs' start and end times: before the first job's run opens
  (imports, Hydra, sweep parent run, first job's checks and data), in-run overhead per job (run
  end - start - train_time_s, median: definition logging, model build, test evaluation, ERF,
  curves figure, logged model), the gap between one job's run and the next (Hydra job set-up,
  checks, data), and after the last run (sweep summary, exit);
- single-run overhead = wall - train_time_s of one ``python train.py`` (start-up not shared).

Both commands record into a store whose schema exists already, as a researcher's store does
after its first run: creating it (MLflow's migrations, ~2 s once per store) is timed on its own.

RSS: the resident memory of the multirun process plus all its child processes (a job's process
under fresh_process) is sampled from outside (psutil, every 0.2 s); the total at each job's run
end gives the growth from the first job to the last, without touching the package. Also the
peak of the total, of the multirun process alone, and of each job's process (fresh_process).
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class RssSampler(threading.Thread):
    """(time.time(), RSS bytes of a process and all its children) every ``interval`` seconds;
    also the peak RSS of the process alone and of each job's process (a multiprocessing
    worker started by ``hydra/launcher=fresh_process``), by pid."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.process, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, int]] = []
        self.own_peak = 0
        self.job_peaks: dict[int, int] = {}  # pid -> peak RSS, in start order
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                own = self.process.memory_info().rss
                children = self.process.children(recursive=True)
            except psutil.Error:
                break
            total = own
            for child in children:
                try:
                    rss = child.memory_info().rss
                    is_job = "spawn_main" in " ".join(child.cmdline())
                except psutil.Error:  # ended between the listing and the read
                    continue
                total += rss
                if is_job:
                    self.job_peaks[child.pid] = max(rss, self.job_peaks.get(child.pid, 0))
            self.own_peak = max(self.own_peak, own)
            self.samples.append((time.time(), total))
            self.done.wait(self.interval)

    def at(self, when: float) -> int | None:
        """The last sample taken at or before ``when``."""
        before = [rss for t, rss in self.samples if t <= when]
        return before[-1] if before else None


def run(cmd: list[str], sample: bool = False) -> tuple[float, float, RssSampler | None]:
    """(wall seconds, time.time() at launch, the RSS sampler when ``sample``)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    launched = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler = RssSampler(proc.pid) if sample else None
    if sampler:
        sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if sampler:
        sampler.done.set()
        sampler.join()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return wall, launched, sampler


def create_store(uri: str) -> float:
    """Create the SQLite store's schema (MLflow's migrations); the seconds it took. Done before
    either timed command: a store is created once, by a researcher's first run, and timing it
    inside the multirun only (the single run then found it made) tilted the comparison."""
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    MlflowClient(uri).search_experiments(max_results=1)
    return time.perf_counter() - start


def job_runs(uri: str, experiment: str):
    """The experiment's runs that trained (a multirun's parent run has no train_time_s)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment])
    runs = runs[runs["metrics.train_time_s"].notna()]
    return runs.sort_values("start_time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 jobs")
    parser.add_argument("--jobs", type=int, default=None, help="multirun size (default 10)")
    parser.add_argument("--epochs", type=int, default=2, help="trainer.epochs per job")
    parser.add_argument("--dataset", default="digits", help="configs/dataset/<name>.yaml")
    parser.add_argument(
        "--launcher",
        choices=("basic", "fresh_process"),
        default="basic",
        help="the multirun's launcher (fresh_process: n_jobs=1, so timings compare)",
    )
    args = parser.parse_args()
    jobs = args.jobs or (4 if args.quick else 10)

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        common = [
            f"dataset={args.dataset}",
            f"trainer.epochs={args.epochs}",
            "trainer.verbose=0",
            f"tracking.uri={uri}",
        ]
        store_s = create_store(uri)
        train_py = [sys.executable, str(ROOT / "train.py")]
        seeds = ",".join(str(s) for s in range(1, jobs + 1))
        launcher = []
        if args.launcher == "fresh_process":
            launcher = ["hydra/launcher=fresh_process", "hydra.launcher.n_jobs=1"]
        multi_wall, launched, sampler = run(
            [
                *train_py,
                "-m",
                *launcher,
                f"trainer.seed={seeds}",
                *common,
                "tracking.experiment=bench-multirun",
                f"hydra.sweep.dir={tmp}/sweep",
            ],
            sample=True,
        )
        multi = job_runs(uri, "bench-multirun")
        single_wall, _, _ = run(
            [
                *train_py,
                "trainer.seed=1",
                *common,
                "tracking.experiment=bench-single",
                f"hydra.run.dir={tmp}/single",
            ]
        )
        single = job_runs(uri, "bench-single")

    if len(multi) != jobs:
        sys.exit(f"expected {jobs} job runs in the store, found {len(multi)}")
    train_times = [float(v) for v in multi["metrics.train_time_s"]]
    spans = zip(multi["start_time"], multi["end_time"], strict=True)
    run_seconds = [(end - start).total_seconds() for start, end in spans]
    in_run = [s - t for s, t in zip(run_seconds, train_times, strict=True)]
    starts = [t.timestamp() for t in multi["start_time"]]
    ends = [t.timestamp() for t in multi["end_time"]]
    gaps = [b - a for a, b in zip(ends[:-1], starts[1:], strict=True)] or [0.0]
    before_first, after_last = starts[0] - launched, launched + multi_wall - ends[-1]
    per_job = (multi_wall - sum(train_times)) / jobs
    single_train = float(single["metrics.train_time_s"].iloc[0])
    single_overhead = single_wall - single_train

    rss_end = [sampler.at(end.timestamp()) for end in multi["end_time"]]
    rss_mb = [round(r / 2**20, 1) for r in rss_end if r is not None]
    rss = {
        "rss_mb_after_each_job": rss_mb,
        "rss_growth_mb": round(rss_mb[-1] - rss_mb[0], 1) if len(rss_mb) > 1 else None,
        "rss_peak_mb": round(max(r for _, r in sampler.samples) / 2**20, 1),
        "rss_multirun_process_peak_mb": round(sampler.own_peak / 2**20, 1),
        "rss_job_process_peak_mb": [round(r / 2**20, 1) for r in sampler.job_peaks.values()],
    }
    if len(rss_mb) > 1:
        rss["rss_growth_mb_per_job"] = round((rss_mb[-1] - rss_mb[0]) / (len(rss_mb) - 1), 1)

    print(
        f"{args.dataset}, simple_cnn, {args.epochs} epochs per job, {args.launcher} launcher, "
        f"{os.cpu_count()} CPU cores"
    )
    rows = [
        (f"multirun of {jobs}: wall", multi_wall),
        ("  sum of train_time_s", sum(train_times)),
        ("  overhead per job", per_job),
        ("  before the first job's run", before_first),
        ("  in-run overhead per job (median)", statistics.median(in_run)),
        ("  gap between jobs' runs (median)", statistics.median(gaps)),
        ("  after the last job's run", after_last),
        ("single run: wall", single_wall),
        ("  train_time_s", single_train),
        ("  overhead", single_overhead),
        ("store created before both (untimed)", store_s),
    ]
    for label, seconds in rows:
        print(f"{label:<36}{seconds:>9.2f} s")
    if rss["rss_growth_mb"] is not None:
        print(
            f"{'RSS after job 1 -> job ' + str(len(rss_mb)):<36}{rss_mb[0]:>9.0f} -> "
            f"{rss_mb[-1]:.0f} MB ({rss['rss_growth_mb']:+.0f} MB, "
            f"{rss['rss_growth_mb_per_job']:+.1f} MB/job; peak {rss['rss_peak_mb']:.0f} MB)"
        )
    print(f"{'RSS peak, multirun process alone':<36}{rss['rss_multirun_process_peak_mb']:>9.0f} MB")
    if rss["rss_job_process_peak_mb"]:
        peaks = ", ".join(f"{r:.0f}" for r in rss["rss_job_process_peak_mb"])
        print(f"{'RSS peak of each job process':<36}{peaks} MB")
    summary = {
        "dataset": args.dataset,
        "launcher": args.launcher,
        "epochs": args.epochs,
        "jobs": jobs,
        "multirun_wall_s": round(multi_wall, 2),
        "multirun_train_time_s": round(sum(train_times), 2),
        "per_job_overhead_s": round(per_job, 2),
        "before_first_run_s": round(before_first, 2),
        "in_run_overhead_s_median": round(statistics.median(in_run), 2),
        "gap_between_runs_s_median": round(statistics.median(gaps), 2),
        "after_last_run_s": round(after_last, 2),
        "single_wall_s": round(single_wall, 2),
        "single_train_time_s": round(single_train, 2),
        "single_overhead_s": round(single_overhead, 2),
        "overhead_saved_per_job_s": round(single_overhead - per_job, 2),
        "store_creation_s": round(store_s, 2),
        **rss,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
