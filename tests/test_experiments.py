"""Shipped sweep configs, without training: every grid point of every experiment and every
corner of every Optuna search space composes through Hydra and is a valid stack on its
dataset (the same checks a job runs before it trains)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf

import convnets.config  # noqa: F401  (registers the schemas)
from convnets.architecture import analyze, resolve_stack

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONFIGS / "hparams_search").glob("*.yaml"))
INPUT_SHAPES = {"digits": [8, 8, 1], "mnist": [28, 28, 1], "cifar10": [32, 32, 3]}
SEARCH_SPACE = {  # what every single-objective Optuna search tunes
    "optimizer.lr",
    "model.layer_defaults.dropout",
    "model.layer_defaults.kernel_size",
    "model.width",
    "model.layer_defaults.dilation",
}


@pytest.fixture(scope="module")
def hydra_compose():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda overrides, **kw: compose("train", overrides=overrides, **kw)


def _check_valid_stack(cfg) -> tuple[int, int]:
    """The job's pre-training checks; returns (param_count, receptive_field)."""
    assert cfg.dataset.input_shape == INPUT_SHAPES[cfg.dataset.name]
    analysis = analyze(resolve_stack(cfg.model), cfg.dataset.input_shape, cfg.dataset.num_classes)
    assert analysis.param_count > 0 and min(analysis.feature_shape) >= 1
    return analysis.param_count, analysis.receptive_field


def test_the_issue_experiments_are_shipped():
    assert {"rf_vs_accuracy", "width_vs_depth", "stride_vs_pooling"} <= set(EXPERIMENTS)
    assert "depth_over_seeds" in EXPERIMENTS  # two stacks over 5 seeds
    assert {"digits_optuna", "mnist_optuna", "cifar10_optuna"} <= set(SEARCHES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_grid_point_composes_to_a_valid_stack(hydra_compose, name):
    base = hydra_compose([f"experiment={name}"], return_hydra_config=True)
    assert base.tracking.experiment == name  # the MLflow experiment is named after the study
    params = [f"{key}={value}" for key, value in base.hydra.sweeper.params.items()]
    # Hydra's own grid expansion: what `python train.py -m experiment=<name>` launches.
    (grid,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    assert len(grid) >= 4

    designs = set()
    for point in grid:
        cfg = hydra_compose([f"experiment={name}", *point])
        assert cfg.dataset.name == base.dataset.name
        params_rf = _check_valid_stack(cfg)
        designs.add((str(cfg.model), params_rf))
    # Every configuration is a different model; the seeds of a seed study repeat one.
    configurations = {
        tuple(o for o in point if not o.startswith("trainer.seed=")) for point in grid
    }
    assert len(designs) == len(configurations)


def test_rf_vs_accuracy_spans_depth_dilation_and_kernel(hydra_compose):
    base = hydra_compose(["experiment=rf_vs_accuracy"], return_hydra_config=True)
    assert base.dataset.name == "mnist"
    assert set(base.hydra.sweeper.params) == {
        "model.layers",
        "model.layer_defaults.dilation",
        "model.layer_defaults.kernel_size",
    }
    # No stride, no pooling: RF = 1 + depth * dilation * (kernel - 1), the study's premise.
    cfg = hydra_compose(
        [
            "experiment=rf_vs_accuracy",
            "model.layer_defaults.dilation=4",
            "model.layer_defaults.kernel_size=5",
        ]
    )
    assert _check_valid_stack(cfg)[1] == 1 + len(cfg.model.layers) * 4 * (5 - 1)


def _corners(sweep_value) -> list:
    """A search dimension's extreme values: every choice, or an interval's two ends."""
    if isinstance(sweep_value, ChoiceSweep):
        return list(sweep_value.list)
    assert isinstance(sweep_value, IntervalSweep)
    return [sweep_value.start, sweep_value.end]


def _grammar(value) -> str:
    """A parsed sweep value back in Hydra's override grammar (``[{filters:16}]``)."""
    if isinstance(value, list):
        return "[" + ",".join(_grammar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_grammar(v)}" for k, v in value.items()) + "}"
    return str(value)


@pytest.mark.parametrize("name", SEARCHES)
def test_optuna_search_space_corners_compose_to_valid_stacks(hydra_compose, name):
    base = hydra_compose([f"hparams_search={name}"], return_hydra_config=True)
    sweeper = base.hydra.sweeper
    assert "ConvnetsOptunaSweeper" in sweeper._target_
    assert sweeper.objectives[0] == "selected_val_accuracy:max" and sweeper.seed is not None
    assert sweeper.storage is None  # optuna.db beside mlflow.db: rerunning resumes
    if name.endswith("_pareto"):  # accuracy against parameters, over whole stacks
        assert len(sweeper.objectives) == 2 and "model.layers" in sweeper.params
    else:
        assert set(sweeper.params) == SEARCH_SPACE
    assert base.tracking.experiment == name

    parsed = OverridesParser.create().parse_overrides(
        [f"{key}={value}" for key, value in sweeper.params.items()]
    )
    assert "log" in next(o for o in parsed if o.key_or_group == "optimizer.lr").value().tags
    keys = [o.key_or_group for o in parsed]
    corners = list(itertools.product(*(_corners(o.value()) for o in parsed)))
    # One trial composed by Hydra as the sweeper launches it; the other corners change only
    # these values, set on a copy of its typed config (a Hydra compose costs ~0.25 s each).
    trial = hydra_compose(
        [
            f"hparams_search={name}",
            *(f"{k}={_grammar(v)}" for k, v in zip(keys, corners[-1], strict=True)),
        ]
    )
    for values in corners:
        cfg = copy.deepcopy(trial)
        for key, value in zip(keys, values, strict=True):
            OmegaConf.update(cfg, key, value, merge=isinstance(value, list))  # typed layers
        _check_valid_stack(cfg)


def test_slurm_launcher_preset(hydra_compose):
    cfg = hydra_compose(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node >= 1
    assert launcher.tasks_per_node == 1  # one process per job: MirroredStrategy inside it


def test_local_config_is_read_last_and_optional(hydra_compose, tmp_path):
    """``configs/local/default.yaml`` (git-ignored) sets machine-specific keys after any
    experiment; the command line still wins; without it everything composes as before."""
    if (CONFIGS / "local" / "default.yaml").exists():
        pytest.skip("this checkout has its own configs/local/default.yaml")
    local = tmp_path / "local"
    local.mkdir()
    (local / "default.yaml").write_text(
        "# @package _global_\ntracking:\n  uri: sqlite:///elsewhere.db\n"
        "dataset:\n  data_dir: /data/tfds\n"
    )
    plain = hydra_compose(["experiment=rf_vs_accuracy"])
    searched = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=rf_vs_accuracy"]
    cfg = hydra_compose(searched)
    wins = hydra_compose([*searched, "tracking.uri=sqlite:///cli.db"])
    assert plain.tracking.uri == "sqlite:///mlflow.db" and plain.dataset.data_dir is None
    assert cfg.tracking.uri == "sqlite:///elsewhere.db" and cfg.dataset.data_dir == "/data/tfds"
    assert cfg.tracking.experiment == "rf_vs_accuracy"  # the experiment's keys are kept
    assert wins.tracking.uri == "sqlite:///cli.db"


@pytest.mark.parametrize("group", ["optimizer", "trainer", "tracking", "distribute"])
def test_option_files_state_only_what_differs_from_the_schema(group):
    """Defaults live once, in the schema (convnets/config.py); an option file that restated one
    would silently keep the old value when the schema's changes."""
    import typing
    from dataclasses import MISSING, fields

    from omegaconf import OmegaConf

    from convnets.config import TrainConfig

    schema = typing.get_type_hints(TrainConfig)[group]
    defaults = {f.name: f.default for f in fields(schema) if f.default is not MISSING}
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        stated = OmegaConf.to_container(OmegaConf.load(path)) or {}
        stated.pop("name", None), stated.pop("strategy", None)  # the option's own name
        restated = [k for k, v in stated.items() if k in defaults and v == defaults[k]]
        assert not restated, f"{path.name} restates the schema's defaults: {restated}"


def test_the_seed_study_runs_two_stacks_over_the_same_five_seeds(hydra_compose):
    base = hydra_compose(["experiment=depth_over_seeds"], return_hydra_config=True)
    params = [f"{key}={value}" for key, value in base.hydra.sweeper.params.items()]
    (grid,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    seeds: dict[str, set[int]] = {}
    for point in grid:
        cfg = hydra_compose(["experiment=depth_over_seeds", *point])
        seeds.setdefault(str(cfg.model.layers), set()).add(cfg.trainer.seed)
    assert list(seeds.values()) == [{0, 1, 2, 3, 4}] * 2
