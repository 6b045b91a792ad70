"""How ``hydra/launcher=fresh_process`` launches: each job in a new process, ``n_jobs`` at once.

Why by hand: no Hydra launcher runs each job in a process of its own with bounded parallelism.
The basic launcher runs every job in the sweep's process, where TensorFlow/Keras's own state
grows ~15 MB a job however much is cleared between jobs; joblib (loky) reuses its worker
processes, so the growth moves into the workers; submitit's local executor starts every job of
the sweep at once. Here each job gets a :class:`~concurrent.futures.ProcessPoolExecutor` of
one spawned worker, which exits as soon as its job has returned, and the sweep keeps at most
``n_jobs`` of them running. One pool per job rather than one pool of ``n_jobs``:
a worker that dies (SIGKILL, out of memory, a crash in native code) breaks its whole pool, and
a shared pool would then SIGTERM the other running jobs and fail every pending one; a pool per
job loses only the job that died.

What runs in the worker mirrors Hydra's joblib launcher (``hydra_joblib_launcher._core``):
restore Hydra's singletons (ConfigStore, plugins), load the job's sweep config, set its id and
number, ``run_job`` into ``hydra.sweep.dir``; the :class:`~hydra.core.utils.JobReturn` comes
back to the sweep, so sweepers (basic, ``convnets_optuna``) and callbacks work unchanged. The
task function is a closure (``report_user_errors.<locals>.wrapper`` around ``train.py``'s
``main``), which the pool's pickle cannot send: the payload travels as cloudpickle bytes.

A job whose process dies is one failed job, as a job that fails in a multirun is: its MLflow
run (left RUNNING) is ended FAILED from here with the reason, one ``error:`` line is printed,
and it returns ``nan``; the other jobs go on. Ctrl-C stops the sweep as with the basic
launcher: running jobs record their runs KILLED (bounded by ``stop_grace_s``), exit 130.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

if TYPE_CHECKING:
    from hydra_plugins.convnets_launcher.fresh_process_launcher import FreshProcessLauncher

log = logging.getLogger(__name__)

INTERRUPTED = 130  # exit status of a job (and the sweep) stopped by Ctrl-C


def launch(
    launcher: FreshProcessLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    import cloudpickle  # the task function is a closure: plain pickle cannot send it

    setup_globals()
    assert launcher.config is not None, "setup() first"
    assert launcher.hydra_context is not None and launcher.task_function is not None
    config = launcher.config
    n_jobs = launcher.n_jobs
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs < 1:
        # A HydraException is reported by the entry point as one ``error:`` line.
        raise HydraException(f"hydra.launcher.n_jobs={n_jobs}: jobs at once, 1 or more")
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "FreshProcessLauncher(n_jobs=%d) is launching %d jobs, each in a new process",
        n_jobs,
        len(job_overrides),
    )
    log.info("Launching jobs, sweep output dir : %s", sweep_dir)
    shared = cloudpickle.dumps(
        (
            launcher.hydra_context,
            config,
            launcher.task_function,
            Singleton.get_state(),
        )
    )
    waiting = collections.deque(enumerate(job_overrides, start=initial_job_idx))
    running: dict[Future, _Job] = {}
    returns: dict[int, JobReturn] = {}
    try:
        while waiting or running:
            while waiting and len(running) < n_jobs:
                idx, overrides = waiting.popleft()
                job = _Job(idx, overrides, shared)
                running[job.future] = job
                shown = " ".join(filter_overrides(overrides))
                log.info("\t#%d : %s (process %s)", idx, shown, job.pid)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                returns[job.idx] = job.result(config)
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt) or (
            isinstance(err, SystemExit) and err.code == INTERRUPTED
        )
        _stop(list(running.values()), config, launcher.stop_grace_s, interrupted)
        if isinstance(err, KeyboardInterrupt):
            raise SystemExit(INTERRUPTED) from None
        raise
    return [returns[idx] for idx in range(initial_job_idx, initial_job_idx + len(job_overrides))]


class _Job:
    """One job in its own single-worker pool."""

    def __init__(self, idx: int, overrides: Sequence[str], shared: bytes):
        self.idx, self.overrides = idx, list(overrides)
        self.executor = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
        self.future = self.executor.submit(_run_in_this_process, shared, idx, self.overrides)
        # The pool starts its worker in submit(); its Process gives the pid and, if it dies,
        # the exit code (the pool has no public accessor for either).
        workers = list((getattr(self.executor, "_processes", None) or {}).values())
        self.process: Any = workers[0] if workers else None
        self.pid = self.process.pid if self.process is not None else "?"
        # No other task will come: the worker exits as soon as this one has returned, whatever
        # the sweep's process is doing then (e.g. waiting for the other jobs after a Ctrl-C).
        # Not max_tasks_per_child=1: a worker that exits by it makes the pool (CPython 3.11)
        # start a replacement, an interpreter start and imports for nothing.
        self.executor.shutdown(wait=False)

    def result(self, config: Any) -> JobReturn:
        """The job's JobReturn; a died process is a failed job (see the module docstring).
        An exception the worker raised outside ``run_job`` (the SystemExit of a Ctrl-C'd job,
        a launcher bug) is raised here."""
        import cloudpickle

        data = None
        try:
            data = self.future.result()
        except BrokenProcessPool:
            pass
        finally:
            if self.process is not None:
                self.process.join()  # it exits right after its job, or has died
        return self._died(config) if data is None else cloudpickle.loads(data)

    def _died(self, config: Any) -> JobReturn:
        exitcode = self._exitcode()
        reason = (
            f"its process ({self.pid}) ended abruptly ({_how(exitcode)}) before the job returned"
        )
        ended = _end_runs_left_running(config, self.idx, "FAILED", reason)
        recorded = f"; run {', '.join(ended)} recorded FAILED" if ended else ""
        shown = " ".join(filter_overrides(self.overrides))
        print(f"error: job #{self.idx} ({shown}): {reason}{recorded}", file=sys.stderr, flush=True)
        # As convnets.job.train does for a job that fails in a multirun: recorded FAILED,
        # one line, nan (status COMPLETED), so the sweep goes on and its summary counts it.
        ret = JobReturn(
            overrides=self.overrides,
            working_dir=os.getcwd(),
            task_name=str(config.hydra.job.name),
            status=JobStatus.COMPLETED,
        )
        ret.return_value = float("nan")
        return ret

    def _exitcode(self) -> int | None:
        """The dead worker's exit code. The pool's own thread reaps a broken pool's workers too:
        when it wins the race for the process's status, this process's ``join`` returns before
        that thread has stored it; it is there a moment later."""
        if self.process is None:
            return None
        deadline = time.monotonic() + 5
        while self.process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.process.exitcode


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
        return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _end_runs_left_running(config: Any, idx: int, status: str, reason: str) -> list[str]:
    """Best effort: the store may be what failed; the job's failure is reported either way."""
    from convnets.sweep import end_runs_left_running

    timeout = OmegaConf.select(config, "tracking.http_timeout_s", default=10.0)
    try:
        return end_runs_left_running(config.hydra.sweep.dir, idx, status, reason, timeout)
    except Exception as err:  # noqa: BLE001
        log.warning("job #%d: its run could not be ended %s: %s", idx, status, err)
        return []


def _stop(jobs: list[_Job], config: Any, grace_s: float, interrupted: bool) -> None:
    """Stop the running jobs, bounded: none is left behind, and none hangs the sweep.

    On Ctrl-C the terminal's SIGINT reached the jobs too: they get ``grace_s`` to record their
    runs KILLED and exit by themselves. Then each job still running gets one SIGINT (another
    would interrupt its recording), ``grace_s`` again, then SIGKILL; the runs of jobs that
    could not end them are ended KILLED from here.
    """
    # Every worker this process started, including one whose pool was being created.
    workers = multiprocessing.active_children()
    try:
        if workers and interrupted:
            print(
                f"interrupted: waiting up to {grace_s:g} s for {len(workers)} running job(s) "
                "to record their runs",
                file=sys.stderr,
                flush=True,
            )
            _join(workers, grace_s)
        survivors = [w for w in workers if w.is_alive()]
        for worker in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGINT)
        _join(survivors, grace_s)
    finally:  # also after a second Ctrl-C: no job outlives the sweep
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    reason = "the sweep was stopped before the job recorded its end"
    for job in jobs:
        _end_runs_left_running(config, job.idx, "KILLED", reason)


def _join(workers: list[Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------- in the job's process


def _run_in_this_process(shared: bytes, idx: int, overrides: list[str]) -> bytes:
    """The job, in its worker: as ``hydra_joblib_launcher._core.execute_job``; the JobReturn
    goes back pickled."""
    import cloudpickle

    hydra_context, config, task_function, singleton_state = cloudpickle.loads(shared)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    return _pickled(ret)


def _pickled(ret: JobReturn) -> bytes:
    """The JobReturn for the sweep's process, by cloudpickle: its configs hold the plugins'
    config classes, which ``Singleton.set_state`` re-created here by re-running Hydra's plugin
    scan, so plain pickle no longer finds them by name (cloudpickle sends them by value, as
    joblib's loky does). A failed job's exception that does not pickle is sent as a
    RuntimeError saying what it was."""
    import cloudpickle

    try:
        return cloudpickle.dumps(ret)
    except Exception as err:  # noqa: BLE001
        value = ret._return_value
        ret.return_value = RuntimeError(f"{type(value).__name__}: {value} (unpicklable: {err})")
        return cloudpickle.dumps(ret)
