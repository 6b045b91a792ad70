"""What ``python evaluate.py`` does with its config: exactly one of ``run_id``, ``checkpoint``
and ``compare``.

TensorFlow (with :mod:`convnets.evaluation`) loads only to evaluate a model, and for
``run_id=`` only once the store and the run answered: a typo costs ~2 s instead of ~7, and
``compare=`` (tables and plots of recorded runs) never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from convnets import checkpoints, comparison
from convnets.checks import check_dataset, check_interpolations, check_known_keys
from convnets.config import RUNTIME_KEYS, DatasetConfig, is_runtime_key, override_key
from convnets.errors import ConfigError
from convnets.sweep_files import is_parent
from convnets.tracking import Tracker, require_existing_store

if TYPE_CHECKING:
    from convnets.evaluation import EvalReport

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig,
    default_out_dir: str | Path,
    libraries_loaded: Callable[[], None] | None = None,
    overrides: Sequence[str] = (),
) -> EvalReport | comparison.CompareReport:
    """Evaluate ``run_id``'s logged model or the ``checkpoint`` file, or compare the runs of
    ``compare`` (an experiment name or a sweep's parent run id). Files go to ``output_dir``
    (default ``default_out_dir``, Hydra's run directory): ``evaluation/*.png`` or the
    compare report. ``libraries_loaded`` is called once TensorFlow is loaded, before the
    model: the entry point's process-wide settings that need it. ``overrides``: the command
    line's, as typed (a ``dataset.*`` key given there counts even at its default value).
    """
    check_interpolations(cfg)
    empty = [k for k in ("run_id", "checkpoint", "compare", "baseline") if cfg.get(k) == ""]
    if empty:  # an unset shell variable: $RUN gave nothing
        raise ConfigError(
            f"{empty[0]}= is empty (an unset shell variable?); give it a value or leave it out"
        )
    chosen = [key for key in ("run_id", "checkpoint", "compare") if cfg.get(key)]
    if not chosen and cfg.get("baseline"):
        raise ConfigError(
            f"baseline={cfg.baseline} names the group the others are tested against in a "
            "comparison: add compare=<experiment name or sweep parent run id>"
        )
    if len(chosen) != 1:
        given = ", ".join(chosen) if chosen else "none"
        raise ConfigError(
            "evaluate.py needs exactly one of run_id=<mlflow run id>, checkpoint=<path.keras>, "
            f"compare=<experiment name or sweep parent run id> (given: {given})"
        )
    check_known_keys(cfg)  # +key=... is added past the schema: close it again
    if cfg.get("baseline") and not cfg.compare:
        raise ConfigError(
            f"baseline={cfg.baseline} names the group the others are tested against in a "
            "comparison: add compare=<experiment name or sweep parent run id>"
        )
    dataset, dataset_keys = dataset_given(cfg, overrides)
    if dataset is not None:
        check_dataset(cfg)
    out_dir = Path(cfg.output_dir or default_out_dir)
    if cfg.checkpoint:
        checkpoints.check_model_file(Path(cfg.checkpoint))  # before TensorFlow loads
        evaluation = _evaluation(libraries_loaded)
        report = evaluation.evaluate_checkpoint(
            cfg.checkpoint,
            out_dir / evaluation.EVAL_DIR,
            dataset=dataset,
            dataset_overrides=dataset_keys,
            batch_size=cfg.batch_size,
        )
        log.info("checkpoint %s: %s; figures in %s", cfg.checkpoint, _fmt(report), out_dir)
        return report
    require_existing_store(
        cfg.tracking.uri, f"compare={cfg.compare}" if cfg.compare else f"run_id={cfg.run_id}"
    )
    tracker = Tracker(cfg.tracking.uri, http_timeout_s=cfg.tracking.http_timeout_s)
    tracker.check_store()
    if cfg.compare:
        return comparison.compare(tracker, str(cfg.compare), out_dir, cfg.baseline)
    run_id = str(cfg.run_id)
    _check_run_dataset_keys(run_id, dataset, dataset_keys)
    run = tracker.get_run(run_id)  # an unknown id is refused here, before TensorFlow loads
    if is_parent(run.data.tags):
        raise ConfigError(
            f"run_id={run_id} is the parent run of a sweep or search, which trains no model; "
            f"compare its jobs with compare={run_id}"
        )
    evaluation = _evaluation(libraries_loaded)
    report = evaluation.evaluate_run(
        tracker,
        run_id,
        out_dir / evaluation.EVAL_DIR,
        batch_size=cfg.batch_size,
        dataset_overrides=dataset_keys,
    )
    log.info("run %s: %s; figures logged under %s/", run_id, _fmt(report), evaluation.EVAL_DIR)
    return report


def dataset_given(
    cfg: DictConfig, overrides: Sequence[str] = ()
) -> tuple[DictConfig | None, dict[str, Any]]:
    """``(dataset, keys)``: the ``dataset=<name>`` section chosen on the command line (None
    without one), else the ``dataset.<key>`` values given alone, as ``{"dataset.path": ...}``.

    Without a choice the section is the schema's defaults (``configs/evaluate.yaml``), so a
    key given is one named in ``overrides`` (even at its default value) or, from a user's own
    config file, one that differs from its default.
    """
    node = cfg.get("dataset")
    if node is None:
        return None, {}
    if not OmegaConf.is_missing(node, "name"):
        return node, {}
    values = OmegaConf.to_container(node, resolve=True)
    defaults = OmegaConf.to_container(OmegaConf.structured(DatasetConfig))
    named = {override_key(o).removeprefix("dataset.") for o in overrides}
    return None, {
        f"dataset.{k}": v for k, v in values.items() if k in named or v != defaults.get(k)
    }


def _check_run_dataset_keys(
    run_id: str, dataset: DictConfig | None, dataset_keys: dict[str, Any]
) -> None:
    """``run_id=`` tests the model on the dataset its run recorded: only where that data lives
    on this machine (the runtime keys ``reproduce=`` accepts too) may be given with it."""
    allowed = ", ".join(key for key in RUNTIME_KEYS if key.startswith("dataset."))
    if dataset is not None:
        raise ConfigError(
            f"dataset={dataset.name}: run_id={run_id} evaluates the run's model on the dataset "
            f"the run recorded; give only where that data lives ({allowed}), or evaluate the "
            f"model on other data with checkpoint=<its model.keras> dataset={dataset.name}"
        )
    others = [key for key in dataset_keys if not is_runtime_key(key)]
    if others:
        raise ConfigError(
            f"{', '.join(others)}: run_id={run_id} evaluates the run's model on the dataset the "
            f"run recorded; drop {'it' if len(others) == 1 else 'them'} -- only where that data "
            f"lives may be given ({allowed})"
        )


def _evaluation(libraries_loaded: Callable[[], None] | None):
    """:mod:`convnets.evaluation` (TensorFlow), imported only to evaluate a model."""
    from convnets import evaluation

    if libraries_loaded is not None:
        libraries_loaded()
    return evaluation


def _fmt(report: EvalReport) -> str:
    m = report.metrics
    erf = m.get("effective_receptive_field")
    return (
        f"eval_accuracy={m['eval_accuracy']:.4f} eval_loss={m['eval_loss']:.4f} "
        f"effective_receptive_field={'undefined' if erf is None else f'{erf:.0f}'}"
    )
