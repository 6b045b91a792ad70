"""How ``hydra/launcher=fresh_process`` launches: each job in a new process, ``n_jobs`` at once.

Why by hand: no Hydra launcher runs each job in a process of its own with bounded parallelism.
The basic launcher runs every job in the sweep's process, where TensorFlow/Keras's own state
grows ~15 MB a job however much is cleared between jobs; joblib (loky) reuses its worker
processes, so the growth moves into the workers; submitit's local executor starts every job of
the sweep at once. Here each job gets a spawned :class:`multiprocessing.Process` of its own,
which exits as soon as its job has returned, and a pipe of its own that brings the result
back; the sweep keeps at most ``n_jobs`` of them running. A process per job rather than a pool
of ``n_jobs``: a worker that dies (SIGKILL, out of memory, a crash in native code) breaks a
whole :class:`~concurrent.futures.ProcessPoolExecutor`, which then SIGTERMs the other running
jobs and fails every pending one; a process per job loses only the job that died.

What runs in the job's process mirrors Hydra's joblib launcher
(``hydra_joblib_launcher._core``): restore Hydra's singletons (ConfigStore, plugins), load the
job's sweep config, set its id and number, ``run_job`` into ``hydra.sweep.dir``; the
:class:`~hydra.core.utils.JobReturn` comes back to the sweep, so sweepers (basic,
``convnets_optuna``) and callbacks work unchanged. The task function is a closure
(``report_user_errors.<locals>.wrapper`` around ``train.py``'s ``main``), which plain pickle
cannot send: the payload travels as cloudpickle bytes.

A job whose process dies is one failed job, and the other jobs go on: one ``error:`` line says
how it died, and Hydra's callbacks get its end (``on_job_end``) as a FAILED JobReturn whose
error says so, as ``run_job`` would have given it to them had the process lived. What that
means for the job's record (its MLflow run) is the callbacks' to decide: this plugin is a
Hydra launcher and imports nothing of the application it launches. The sweeper gets ``nan``
for the job: Hydra's basic sweeper re-raises a FAILED job's error and stops the whole sweep.
Ctrl-C stops the sweep as with the basic launcher: running jobs get ``stop_grace_s`` to end by
themselves, the callbacks get the end of those that could not (a KeyboardInterrupt), exit 130.
A stop signal that the application raises in the sweep's process as a KeyboardInterrupt with
the signal's number as ``signum`` (SIGTERM, SIGHUP: sent to that process alone) is passed on
to the running jobs, and the sweep exits 128 + that number, as a process it killed would.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
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
from omegaconf import DictConfig, open_dict

if TYPE_CHECKING:
    from hydra.types import HydraContext

    from hydra_plugins.convnets_launcher.fresh_process_launcher import FreshProcessLauncher

log = logging.getLogger(__name__)

INTERRUPTED = 130  # exit status of a job (and the sweep) stopped by Ctrl-C


class JobProcessDied(ChildProcessError):
    """A job's process ended before it sent its result back (given to ``on_job_end``)."""


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
    running: list[_Job] = []
    returns: dict[int, JobReturn] = {}
    try:
        while waiting or running:
            while waiting and len(running) < n_jobs:
                idx, overrides = waiting.popleft()
                job = _Job(idx, overrides, shared)
                running.append(job)
                shown = " ".join(filter_overrides(overrides))
                log.info("\t#%d : %s (process %s)", idx, shown, job.pid)
            ready = multiprocessing.connection.wait([job.results for job in running])
            for job in [job for job in running if job.results in ready]:
                running.remove(job)
                returns[job.idx] = job.outcome(launcher)
    except BaseException as err:
        signum = _stop_signal(err)
        interrupted = signum is not None or (
            isinstance(err, SystemExit) and err.code == INTERRUPTED
        )
        _stop(running, launcher, interrupted, signum or signal.SIGINT, err)
        if signum is not None:
            raise SystemExit(128 + signum) from None
        raise
    return [returns[idx] for idx in range(initial_job_idx, initial_job_idx + len(job_overrides))]


class _Job:
    """One job in a spawned process of its own, its result coming back through a pipe."""

    def __init__(self, idx: int, overrides: Sequence[str], shared: bytes):
        self.idx, self.overrides = idx, list(overrides)
        context = multiprocessing.get_context("spawn")
        self.results, sender = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_job_process, args=(sender, shared, idx, self.overrides), name=f"job-{idx}"
        )
        self.process.start()
        # Only the job's process holds the sending end now: when it exits, with its result or
        # without (killed), the receiving end becomes readable, with data or at end of file.
        sender.close()
        self.pid = self.process.pid

    def outcome(self, launcher: FreshProcessLauncher) -> JobReturn:
        """The job's JobReturn, once its end is readable; a process that died without sending
        one is a failed job (see the module docstring). An exception the job's process raised
        outside ``run_job`` (the SystemExit of a Ctrl-C'd job, a launcher bug) is raised
        here."""
        import cloudpickle

        message = None
        try:
            message = cloudpickle.loads(self.results.recv_bytes())
        except (EOFError, OSError):  # the process ended before it sent anything whole
            pass
        finally:
            self.results.close()
            self.process.join()  # it exits right after sending, or has died
        if message is None:
            return self._died(launcher)
        kind, value = message
        if kind == "raised":
            raise value
        return value

    def _died(self, launcher: FreshProcessLauncher) -> JobReturn:
        how = _how(self.process.exitcode)
        reason = f"its process ({self.pid}) ended abruptly ({how}) before the job returned"
        shown = " ".join(filter_overrides(self.overrides))
        print(f"error: job #{self.idx} ({shown}): {reason}", file=sys.stderr, flush=True)
        _report_end(launcher, self.idx, self.overrides, JobProcessDied(reason))
        ret = JobReturn(
            overrides=self.overrides,
            working_dir=os.getcwd(),
            task_name=str(launcher.config.hydra.job.name),
            status=JobStatus.COMPLETED,
        )
        ret.return_value = float("nan")  # a failed objective to the sweeper, which sweeps on
        return ret


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
        return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _report_end(
    launcher: FreshProcessLauncher, idx: int, overrides: Sequence[str], error: BaseException
) -> None:
    """Hydra's callbacks get the end of a job whose process could not give it to them: a
    FAILED JobReturn holding ``error``, with the job's own config, through the same
    ``HydraContext.callbacks`` that ``run_job`` calls. Best effort (Hydra's callbacks turn
    their errors into warnings): the job's failure is reported either way."""
    assert launcher.hydra_context is not None and launcher.config is not None
    try:
        config = _job_config(launcher.hydra_context, launcher.config, idx, overrides)
    except Exception:  # noqa: BLE001 - the job's process may have died composing it
        config = copy.deepcopy(launcher.config)
        with open_dict(config):
            config.hydra.job.num = idx
            config.hydra.overrides.task = list(overrides)
    ret = JobReturn(
        overrides=list(overrides),
        working_dir=os.getcwd(),
        task_name=str(config.hydra.job.name),
        status=JobStatus.FAILED,
    )
    ret.return_value = error
    try:
        launcher.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
    except Exception as err:  # noqa: BLE001
        log.warning("job #%d: the callbacks could not record its end: %s", idx, err)


def _stop_signal(err: BaseException) -> int | None:
    """The signal that stopped the sweep: a KeyboardInterrupt's ``signum`` (how an application
    raises SIGTERM or SIGHUP like Ctrl-C), SIGINT for Ctrl-C's own, None for anything else."""
    if not isinstance(err, KeyboardInterrupt):
        return None
    signum = getattr(err, "signum", signal.SIGINT)
    return int(signum) if isinstance(signum, int) else int(signal.SIGINT)


def _stop(
    jobs: list[_Job],
    launcher: FreshProcessLauncher,
    interrupted: bool,
    signum: int,
    cause: BaseException,
) -> None:
    """Stop the running jobs, bounded: none is left behind, and none hangs the sweep.

    On Ctrl-C the terminal's SIGINT reached the jobs too; any other stop signal (``signum``)
    was sent to the sweep's process alone, so each job gets it now. They get ``stop_grace_s``
    to record their ends and exit by themselves. Then each job still running gets ``signum``
    once more (another would interrupt its recording), ``stop_grace_s`` again, then SIGKILL.
    Hydra's callbacks then get the end of every job stopped, as interrupted: by ``cause``
    when it names its signal (``str(cause)``: "SIGTERM"), else by the sweep's stop.
    """
    grace_s = launcher.stop_grace_s
    # Every process this one started, including one whose start was interrupted.
    workers = multiprocessing.active_children()
    try:
        if workers and interrupted and signum != signal.SIGINT:
            for worker in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)
        if workers and interrupted:
            print(
                f"interrupted: waiting up to {grace_s:g} s for {len(workers)} running job(s) "
                "to record their ends",
                file=sys.stderr,
                flush=True,
            )
            _join(workers, grace_s)
        survivors = [w for w in workers if w.is_alive()]
        for worker in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)
        _join(survivors, grace_s)
    finally:  # also after a second Ctrl-C: no job outlives the sweep
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    for job in jobs:
        job.results.close()
        stopped = (
            cause
            if isinstance(cause, KeyboardInterrupt) and str(cause)
            else KeyboardInterrupt("the sweep was stopped before the job recorded its end")
        )
        _report_end(launcher, job.idx, job.overrides, stopped)


def _join(workers: list[Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


def _job_config(
    hydra_context: HydraContext, config: DictConfig, idx: int, overrides: Sequence[str]
) -> DictConfig:
    """Job ``idx``'s config, as Hydra's launchers compose it."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    return sweep_config


# ---------------------------------------------------------------- in the job's process


def _job_process(sender: Any, shared: bytes, idx: int, overrides: list[str]) -> None:
    """The job's process: run the job, send ``("returned", JobReturn)`` or, for an exception
    raised outside ``run_job``, ``("raised", exception)`` back, and exit."""
    try:
        message = ("returned", _run_in_this_process(shared, idx, overrides))
    except BaseException as err:  # noqa: BLE001 - raised again in the sweep's process
        if not isinstance(err, SystemExit | KeyboardInterrupt):
            traceback.print_exc()
        message = ("raised", err)
    sender.send_bytes(_pickled(message))
    sender.close()


def _run_in_this_process(shared: bytes, idx: int, overrides: list[str]) -> JobReturn:
    """The job: as ``hydra_joblib_launcher._core.execute_job``."""
    import cloudpickle

    hydra_context, config, task_function, singleton_state = cloudpickle.loads(shared)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = _job_config(hydra_context, config, idx, overrides)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _pickled(message: tuple[str, Any]) -> bytes:
    """The message for the sweep's process, by cloudpickle: a JobReturn's configs hold the
    plugins' config classes, which ``Singleton.set_state`` re-created here by re-running
    Hydra's plugin scan, so plain pickle no longer finds them by name (cloudpickle sends them
    by value, as joblib's loky does). What does not pickle (a failed job's exception, say) is
    sent as a RuntimeError saying what it was."""
    import cloudpickle

    try:
        return cloudpickle.dumps(message)
    except Exception as err:  # noqa: BLE001
        kind, value = message
        if kind == "raised":
            return cloudpickle.dumps((kind, RuntimeError(f"{_describe(value)} (unpicklable)")))
        shown = _describe(_job_value(value))
        value.status = JobStatus.FAILED
        value.return_value = RuntimeError(f"{shown} (unpicklable: {err})")
        return cloudpickle.dumps((kind, value))


def _job_value(ret: JobReturn) -> Any:
    """What the job returned, or the exception it failed with. Hydra hands a failed job's
    exception out only by raising it from ``return_value``, which also prints an "Error
    executing job" line: that line is the sweeper's to print, in the sweep's process."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return ret.return_value
        except BaseException as err:  # noqa: BLE001
            return err


def _describe(value: Any) -> str:
    return f"{type(value).__name__}: {value}"
