"""Config schema, ConfigStore entry and Launcher class of ``hydra/launcher=fresh_process``.

Hydra imports this module whenever it scans its plugins, so it stays light: multiprocessing,
cloudpickle and everything a job needs are imported only when a sweep launches (``_core``,
which Hydra's scan skips as a private module). Nothing of ``convnets`` is imported, here or
there: a launcher runs jobs; what a job's end means for its record is the application's.
"""

# No ``from __future__ import annotations``: Hydra executes this module without registering it
# in sys.modules, where dataclasses looks string annotations up.
from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class FreshProcessLauncherConf:
    _target_: str = "hydra_plugins.convnets_launcher.fresh_process_launcher.FreshProcessLauncher"
    # Jobs running at once, each in its own process. 1: one after another, as the basic
    # launcher, with memory that does not grow over the sweep.
    n_jobs: int = 1
    # On Ctrl-C the running jobs get this long to record their ends and exit by themselves
    # (the terminal's SIGINT reaches them too), then one SIGINT from the launcher and as long
    # again, then SIGKILL; Hydra's callbacks then get the end of the jobs that could not give
    # it (convnets' sweep callback ends their runs KILLED).
    stop_grace_s: float = 10.0


ConfigStore.instance().store(
    group="hydra/launcher",
    name="fresh_process",
    node=FreshProcessLauncherConf,
    provider="convnets",
)


class FreshProcessLauncher(Launcher):
    """Runs each job in a new (spawned) process, at most ``n_jobs`` at a time."""

    def __init__(self, n_jobs: int = 1, stop_grace_s: float = 10.0) -> None:
        self.n_jobs = n_jobs
        self.stop_grace_s = stop_grace_s
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from hydra_plugins.convnets_launcher import _core

        return _core.launch(self, job_overrides, initial_job_idx)
