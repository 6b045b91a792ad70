"""The command-line entry points: ``python train.py`` / ``convnets-train``, ``python
evaluate.py`` / ``convnets-evaluate``, ``python -m convnets.inspect`` / ``convnets-inspect``.

Each is a ``@hydra.main`` over the package's ``configs/`` (a user's own through
``hydra.searchpath``) that owns the process: it reads Hydra's state (overrides, output folder,
sweep and trial) and passes it to the library as a :class:`convnets.job.JobContext`, prints
user errors as one ``error:`` line with a non-zero exit (:func:`convnets.cli.run_main`), and
turns Ctrl-C into exit status 130. The same work from Python: :mod:`convnets.api`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import convnets.config  # noqa: F401  (registers the schemas Hydra composes against)
from convnets.cli import (
    exit_status,
    freeze_loaded_libraries,
    report_user_errors,
    run_main,
    stop_requested,
    stop_signals_interrupt,
)

CONFIG_PATH = "configs"  # beside this file: package data


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@report_user_errors
def _train(cfg: DictConfig) -> float:
    """One job; returns its objective (validation accuracy) for Hydra's sweepers."""
    from convnets.checks import check_config

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not multirun:  # a sweep records a bad point as FAILED instead
        check_config(cfg)  # pure: refused before TensorFlow loads or a run is recorded
    from convnets import job, study, sweep, trials  # MLflow: after the pure check

    context = job.JobContext(
        overrides=convnets.config.override_texts(hydra_cfg.overrides.task),
        output_dir=Path(hydra_cfg.runtime.output_dir),
        multirun=multirun,
        sweep=sweep.sweep_context(hydra_cfg) if multirun else None,
        trial=trials.current(hydra_cfg) if multirun else None,
        libraries_loaded=freeze_loaded_libraries,
        stop_requested=stop_requested,
    )
    try:
        # Here too, not only around the command: a job of hydra/launcher=fresh_process runs in
        # a process of its own, where the sweep passes a stop signal on to it.
        with stop_signals_interrupt():
            parent = study.study_parent(cfg) if multirun else None  # -m reproduce=<parent>
            run = study.reproduce(cfg, context, parent) if parent else job.train(cfg, context)
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: the run is recorded KILLED
        if multirun:
            sweep.mark_stopped(str(err) or "KeyboardInterrupt")  # the parent too
        raise SystemExit(exit_status(err)) from None
    return run.objective if run is not None else float("nan")


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
@report_user_errors
def _evaluate(cfg: DictConfig) -> float | None:
    from convnets import evaluate_job  # MLflow

    hydra_cfg = HydraConfig.get()
    report = evaluate_job.run(
        cfg,
        hydra_cfg.runtime.output_dir,
        libraries_loaded=freeze_loaded_libraries,
        overrides=convnets.config.override_texts(hydra_cfg.overrides.task),
    )
    return None if cfg.compare else report.metrics["eval_accuracy"]


@hydra.main(config_path=CONFIG_PATH, config_name="inspect", version_base="1.3")
@report_user_errors
def _inspect(cfg: DictConfig) -> None:
    from convnets import inspection

    inspection.run(cfg)


def train() -> None:
    """``convnets-train`` (``python train.py``)."""
    run_main(_train)


def evaluate() -> None:
    """``convnets-evaluate`` (``python evaluate.py``)."""
    run_main(_evaluate)


def inspect() -> None:
    """``convnets-inspect`` (``python -m convnets.inspect``)."""
    run_main(_inspect)
