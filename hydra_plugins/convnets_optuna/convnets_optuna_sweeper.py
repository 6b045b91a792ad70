"""The Hydra adapter: config schema, ConfigStore entry and Sweeper over :mod:`convnets.search`.

Hydra imports this module whenever it scans its plugins, so it stays light, as Hydra's own
plugins do: the schema comes from :mod:`convnets.search_settings` (no Optuna), the search
loop is imported in :meth:`ConvnetsOptunaSweeper.setup`, and Optuna, MLflow and TensorFlow
only when a search runs.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from convnets.cli import report_user_errors
from convnets.search_settings import Settings

if TYPE_CHECKING:
    from convnets.search import Search


@dataclass
class ConvnetsOptunaSweeperConf(Settings):
    _target_: str = "hydra_plugins.convnets_optuna.convnets_optuna_sweeper.ConvnetsOptunaSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="convnets_optuna",
    node=ConvnetsOptunaSweeperConf,
    provider="convnets",
)


class ConvnetsOptunaSweeper(Sweeper):
    """Asks Optuna for trials, launches them as Hydra jobs, tells their objectives."""

    def __init__(self, **settings: Any) -> None:
        # The settings are read again from the whole config in setup(), as the sweep callback
        # reads them (convnets.search_settings.check), so one code path validates them.
        self.search: Search | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from convnets.search import Search  # the implementation, when a search runs

        launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.search = Search(config, launcher)

    @report_user_errors  # a bad search: one ``error:`` line, no traceback
    def sweep(self, arguments: list[str]) -> None:
        assert self.search is not None, "setup() first"
        self.search.run(arguments)
