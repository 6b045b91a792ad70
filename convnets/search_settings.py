"""A search's settings and objectives (``hydra.sweeper`` of ``hydra/sweeper=convnets_optuna``),
checked once, in one line each, before any job, run or storage exists. No Optuna here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from convnets.config import override_texts
from convnets.errors import ConfigError, warn
from convnets.search_space import parse_space, space_overrides

# Objective -> its usual direction (used when the config names no direction). Each is the
# run's final metric of that name: ``selected_val_accuracy`` is the validation accuracy of the
# epoch whose weights are tested and logged (the restored best epoch under
# trainer.restore_best); ``val_accuracy`` is the last epoch's, as MLflow shows it.
OBJECTIVES = {
    "selected_val_accuracy": "max",
    "val_accuracy": "max",
    "test_accuracy": "max",
    "param_count": "min",
    "receptive_field": "min",
    "effective_receptive_field": "min",
    "macs": "min",
    "train_time_s": "min",
}
# The objectives a run without validation data lacks; a pruned search optimises one of them.
VALIDATION_OBJECTIVES = ("selected_val_accuracy", "val_accuracy")
PRUNERS = ("none", "median", "hyperband")
SAMPLERS = ("tpe", "nsga2", "random")
HEARTBEAT_S = 10  # the sweeper records a heartbeat for every trial in flight this often
STALE_AFTER_FLOOR_S = 2 * HEARTBEAT_S  # the least stale_after_s: two missed heartbeats


@dataclass
class Settings:
    """``hydra.sweeper`` of ``hydra/sweeper=convnets_optuna`` (the plugin's config schema)."""

    objectives: list[str] = field(default_factory=lambda: ["selected_val_accuracy:max"])
    n_trials: int = 20  # the study's total: a rerun with more adds the difference
    n_jobs: int = 1  # trials asked and launched at once (with a parallel launcher)
    pruner: str = "none"  # none | median | hyperband (one objective, a validation accuracy)
    sampler: str = "tpe"  # tpe | nsga2 | random
    n_startup_trials: int = 10  # TPE: random trials before it models the objective(s)
    seed: int = 0
    study_name: str | None = None  # null: the MLflow experiment's name
    storage: str | None = None  # any SQLAlchemy URL; null: optuna.db beside a SQLite MLflow store
    stale_after_s: int = 60  # a RUNNING trial without a heartbeat this long died: asked again
    # key: choice(...) | range(...) | interval(...) | tag(log, ...) | a fixed value
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" | "minimize"


def settings_of(config: DictConfig) -> Settings:
    fields = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
    fields.pop("_target_", None)
    return Settings(**fields)


def is_search(sweeper: DictConfig) -> bool:
    """Whether a multirun's sweeper (``hydra.sweeper``) is ours (``convnets_optuna``)."""
    return str(sweeper.get("_target_", "")).startswith("hydra_plugins.convnets_optuna.")


def parse_objectives(specs: Sequence[str]) -> tuple[Objective, ...]:
    """``["selected_val_accuracy:max", "param_count"]`` -> objectives (direction defaults per
    name)."""
    if not specs:
        raise ConfigError(
            "hydra.sweeper.objectives: empty; give at least one, e.g. [selected_val_accuracy:max]"
        )
    objectives = []
    for spec in specs:
        name, _, way = str(spec).partition(":")
        name, way = name.strip(), way.strip()
        if name not in OBJECTIVES:
            raise ConfigError(
                f"hydra.sweeper.objectives: unknown objective {name!r}; "
                f"valid: {', '.join(OBJECTIVES)}"
            )
        way = way or OBJECTIVES[name]
        if way not in ("max", "min"):
            raise ConfigError(
                f"hydra.sweeper.objectives: {spec!r}: the direction is max or min "
                f"(e.g. {name}:{OBJECTIVES[name]})"
            )
        if any(o.name == name for o in objectives):
            raise ConfigError(f"hydra.sweeper.objectives: {name} is given twice; give it once")
        objectives.append(Objective(name, "maximize" if way == "max" else "minimize"))
    return tuple(objectives)


def check(config: DictConfig) -> tuple[Settings, tuple[Objective, ...]]:
    """Refuse, in one line each, a search that cannot run, before any job or run exists."""
    settings = settings_of(config)
    objectives = parse_objectives(settings.objectives)
    names = [o.name for o in objectives]
    if settings.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={settings.n_trials}: give 1 or more")
    if settings.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={settings.n_jobs}: give 1 or more")
    if settings.n_startup_trials < 0:
        raise ConfigError(
            f"hydra.sweeper.n_startup_trials={settings.n_startup_trials}: give 0 or more"
        )
    if not 0 <= settings.seed < 2**32:  # what NumPy seeds Optuna's samplers with
        raise ConfigError(f"hydra.sweeper.seed={settings.seed}: give 0 to 4294967295 (2**32 - 1)")
    if settings.stale_after_s < STALE_AFTER_FLOOR_S:
        raise ConfigError(
            f"hydra.sweeper.stale_after_s={settings.stale_after_s}: give {STALE_AFTER_FLOOR_S} "
            f"or more (two missed heartbeats, one every {HEARTBEAT_S} s): a live trial must not "
            "be taken for dead"
        )
    if settings.sampler not in SAMPLERS:
        raise ConfigError(
            f"hydra.sweeper.sampler={settings.sampler}: unknown; use {', '.join(SAMPLERS)}"
        )
    if settings.pruner not in PRUNERS:
        raise ConfigError(
            f"hydra.sweeper.pruner={settings.pruner}: unknown; use {', '.join(PRUNERS)}"
        )
    if settings.pruner != "none" and len(objectives) > 1:
        raise ConfigError(
            f"hydra.sweeper.pruner={settings.pruner}: Optuna cannot prune a multi-objective "
            "search; use hydra.sweeper.pruner=none or a single objective"
        )
    if settings.pruner != "none" and names[0] not in VALIDATION_OBJECTIVES:  # one, as above
        raise ConfigError(
            f"hydra.sweeper.pruner={settings.pruner}: pruning compares the trials' per-epoch "
            "val_accuracy; it needs hydra.sweeper.objectives=[selected_val_accuracy:max] "
            "(or [val_accuracy:max])"
        )
    needs_val = [n for n in names if n in VALIDATION_OBJECTIVES]  # a pruned search's too
    if needs_val and not OmegaConf.select(config, "dataset.val_fraction", default=0.1):
        raise ConfigError(
            f"dataset.val_fraction=0: the objective {needs_val[0]} needs validation data; set "
            "dataset.val_fraction=0.1 or optimise another objective (hydra.sweeper.objectives)"
        )
    task = override_texts(OmegaConf.select(config, "hydra.overrides.task", default=[]))
    space, _ = parse_space(space_overrides(settings.params, task))  # a bound Optuna refuses
    if not space:
        raise ConfigError(
            "hydra.sweeper.params: the search space is empty (no choice, range or interval, "
            "there or on the command line), so every trial would train the same configuration; "
            "search a key, e.g. 'optimizer.lr=tag(log, interval(1e-4, 1e-2))', or for seeds "
            "of one configuration run a grid: -m trainer.seed=0,1,2"
        )
    return settings, objectives


def warn_of_a_searched_seed(space: Mapping[str, Any]) -> None:
    """A grid repeats each configuration over ``trainer.seed=0,1,2``; a search samples the
    seed like any other key, and its best configuration then carries a lucky seed."""
    if "trainer.seed" in space:
        warn(
            "trainer.seed: in a search the seed is a hyperparameter like the others (each "
            "trial draws one, and Optuna favours lucky ones), not a repetition of each "
            "configuration; leave it out, then rerun the best configuration over seeds as a "
            "grid: -m trainer.seed=0,1,2 <its overrides>"
        )
