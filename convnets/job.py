"""One training job: config -> checks -> MLflow run -> data, strategy, fit -> the full record.

:func:`train` takes a composed config and a :class:`JobContext` (the overrides, the output
folder, the sweep and search the job belongs to) and returns a :class:`Run`. Its callers own
the process and Hydra: ``python train.py`` (from ``@hydra.main``, the context read from Hydra's
state) and :func:`convnets.train` (its own composition). Nothing here reads Hydra's globals.

Order matters: everything a user can get wrong (the stack, the data, the store, a run id) is
checked before a run is recorded or a model built, so bad input costs seconds and leaves
nothing half-written. These checks run before TensorFlow loads: this module imports
TensorFlow-backed modules (data, distribute, erf, model, plots, trainer, transfer) inside the
steps that use them.

Epochs are numbered from 1 in MLflow (metric step = epoch), as in Keras's progress output.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from convnets import architecture, checkpoints, checks, sweep
from convnets.config import RUNTIME_KEYS, TrackingConfig, TrainConfig, is_runtime_key
from convnets.errors import (
    ConfigError,
    ConvnetsError,
    DiskFull,
    Interrupted,
    TrackingError,
    command,
    out_of_space,
    shell_override,
)
from convnets.tracking import (
    CONFIG_ARTIFACT,
    MODEL_URI_TAG,
    Tracker,
    failure_reason,
    flatten,
    git_changes,
    git_state,
    open_store,
    package_versions,
    redact,
    run_is_finished,
    ui_url,
    where_to_look,
)

if TYPE_CHECKING:
    import keras

    from convnets import data, trainer, transfer
    from convnets.tracking import Run as MlflowRun
    from convnets.trials import TrialLink

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
RUN_NAME_LIMIT = sweep.RUN_NAME_LIMIT  # 60: MLflow's UI shows about that much of a name
CODE_DIFF_ARTIFACT = "code/git_diff.patch"  # a dirty tree's changes against its commit
INPUT_EXAMPLE_IMAGES = 4  # raw test images logged with the model as its input example
# What the logged model's signature takes: the Keras model's own input dtype. With the stored
# dtype (uint8) in the signature, MLflow's REST server casts posted floats to it, so a request
# of normalised 0..1 floats was silently answered for an all-zero image.
SERVED_DTYPE = "float32"
# Overrides that say where or how a run is recorded, not what it is, and group choices the
# name already shows (model, dataset): never part of a run's name outside a sweep.
_NOT_IN_NAME = ("model", "dataset", *sweep.NOT_IN_NAME)


# ---------------------------------------------------------------- entry


@dataclass(frozen=True)
class JobContext:
    """Where a job runs, given by its caller: the overrides it was composed with (they name
    the run and are recorded), the folder for its checkpoints and final model, and in a
    multirun its sweep (parent run) and search trial."""

    overrides: tuple[str, ...] = ()
    output_dir: Path | None = None  # None: a new temporary folder
    multirun: bool = False
    sweep: sweep.SweepContext | None = None
    trial: TrialLink | None = None


@dataclass(frozen=True)
class Run:
    """A finished training run, as recorded in MLflow.

    ``objective``: the validation accuracy a sweep optimises, the restored best epoch's
    when ``trainer.restore_best``, else the last epoch's (``nan`` without validation data).
    ``model_path``: the final model beside the checkpoints (evaluable without the store);
    ``model_uri``: the logged MLflow model (``None`` with ``tracking.log_model=false``).
    """

    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, float]
    params: dict[str, str]
    model_path: Path | None
    model_uri: str | None
    ui_url: str
    objective: float
    pruned: bool = False
    tags: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]


def train(cfg: DictConfig, context: JobContext | None = None) -> Run | None:
    """Train and record one run; return it.

    In a multirun a failing job is recorded FAILED, reported in one ``error:`` line, and
    returns ``None`` so the other jobs still run; otherwise the error propagates (a
    :class:`ConvnetsError` for anything the user can fix). Ctrl-C ends the run KILLED, says
    how to continue it, and re-raises ``KeyboardInterrupt``.
    """
    context = context or JobContext()
    job = _Job(cfg, context)
    try:
        return job.run()
    except KeyboardInterrupt as err:
        where = f"; checkpoint kept in {job.checkpoint_dir}" if job.checkpoint_dir else ""
        hint = f"; continue with: {job.resume_command()}" if job.run_id else ""
        by = f" by {err}" if isinstance(err, Interrupted) else ""
        print(f"interrupted{by}: run {job.run_id} recorded KILLED{where}{hint}", file=sys.stderr)
        raise
    except Exception as err:
        if not context.multirun:
            raise
        job.record_failure(err)
        log.error(
            "job failed: %s", failure_reason(err), exc_info=not isinstance(err, ConvnetsError)
        )
        print(f"error: {failure_reason(err)}", file=sys.stderr, flush=True)
        return None


# ---------------------------------------------------------------- the job


@dataclass
class _Source:
    """The run that ``reproduce=`` or ``resume=`` points at."""

    key: str  # "reproduce" | "resume"
    run: MlflowRun

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


class _Job:
    def __init__(self, cfg: DictConfig, context: JobContext):
        self.cfg = cfg
        self.context = context
        self.overrides = list(context.overrides)
        self.sweep = context.sweep  # set in a multirun (convnets.sweep)
        self.trial = context.trial  # set in a search: its Optuna trial (convnets.search)
        self.tracker: Tracker | None = None
        self.source: _Source | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.checkpoint_dir: Path | None = None
        self.runtime_overrides: list[str] = []  # reproduce=/resume=: applied over the record
        self.init: transfer.Transfer | None = None

    # ------------------------------------------------------------ steps

    def run(self) -> Run:
        cfg = self._resolve_source()  # 1. reproduce= / resume=: the recorded run and config
        stack, input_shape, num_classes, analysis = _check_architecture_and_data(cfg)  # 2.
        experiment_id = self._prepare_store(cfg)  # 3. the store (and init_from's run)
        # 4. only now TensorFlow: the checks above fail in ~2 s, not ~7
        from convnets import data, distribute, trainer, transfer
        from convnets.model import PixelScaling, build_model

        distribute.configure_devices(cfg.distribute)  # 5. before TF touches its devices
        trainer.seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
        trainer.set_precision(cfg.trainer.precision)
        strategy = distribute.make_strategy(cfg.distribute)
        checks.check_batch_split(  # the devices are known only now (e.g. GPUs under auto)
            cfg.trainer.batch_size, strategy.num_replicas_in_sync, "the devices of this machine"
        )
        print(f"devices: {distribute.describe(strategy)}", flush=True)
        bundle = data.load_data(
            cfg.dataset,
            batch_size=cfg.trainer.batch_size,
            seed=cfg.trainer.seed,
            deterministic=cfg.trainer.deterministic,
        )

        def build() -> keras.Model:
            model = build_model(
                stack,
                input_shape,
                num_classes,
                pixel_scaling=PixelScaling(bundle.max_pixel_value, bundle.mean, bundle.std),
                sync_batch_norm=cfg.distribute.sync_batch_norm,
            )
            return self.init.apply(model) if self.init is not None else model

        if cfg.get("init_from"):  # every worker copies the same weights into its model
            self.init = transfer.plan(
                self.tracker,
                str(cfg.init_from),
                build(),
                cfg.trainer.freeze_layers,
                bundle.class_names,
            )

        fit = functools.partial(trainer.fit, build, bundle, cfg.trainer, cfg.optimizer, strategy)
        if not strategy.extended.should_checkpoint:
            return self._run_unrecorded_worker(cfg, fit, bundle)

        resuming = self.source is not None and self.source.key == "resume"
        if resuming:
            self.checkpoint_dir = _resume_folder(self.source.run, cfg)
        with (
            self.tracker.run(
                experiment_id=experiment_id,
                run_name=self._run_name(cfg),
                run_id=self.source.run_id if resuming else None,
                parent_run_id=self.sweep.parent_run_id if self.sweep else None,
                tags=self._tags(cfg, resuming),
            ) as active,
            self._out_of_space_continues(),
        ):  # 6.
            self.run_id = active.info.run_id
            self.experiment_id = active.info.experiment_id
            if resuming:
                self.tracker.clear_failure_reason(self.run_id)
            else:
                # Keyed by the run id: runs sharing a Hydra run dir never touch each other's.
                self.checkpoint_dir = self._output_dir() / "checkpoints" / self.run_id
                self.tracker.set_tags({"checkpoint_dir": str(self.checkpoint_dir)})
                self._log_definition(cfg, analysis, bundle)
            if self.trial is not None:
                self.trial.start(self.run_id)
            with checkpoints.held(self.checkpoint_dir):  # resume= refuses while this trains
                model, result = fit(
                    checkpoint_dir=self.checkpoint_dir,
                    after_epoch=self._epoch_recorder(resuming),
                    resume=resuming,
                    identity={"run_id": self.run_id, "config_digest": config_digest(cfg)},
                )
            if self.trial is not None and self.trial.pruned:
                self._record_pruned(analysis, result)
                return self._recorded(cfg, result, None, pruned=True)
            test = self._log_results(cfg, model, bundle, analysis, result)
            if cfg.tracking.log_model:  # after the results: MLflow links them to the model
                self._log_model(cfg, model, bundle, active.info.run_name)
            final = trainer.save_final_model(
                model, self.checkpoint_dir, OmegaConf.to_yaml(_recordable(cfg))
            )
        print(
            f"model: {final} ({command('evaluate')} {shell_override('checkpoint', final)})",
            flush=True,
        )
        self._print_summary(cfg, test, analysis, result)  # 7.
        return self._recorded(cfg, result, final)

    def _recorded(self, cfg: DictConfig, result, final: Path | None, pruned=False) -> Run:
        """The finished run as the store has it now (metrics, params and tags read back)."""
        recorded = self.tracker.get_run(self.run_id)
        return Run(
            run_id=self.run_id,
            experiment_id=self.experiment_id,
            tracking_uri=self.tracker.shown_uri,
            metrics=dict(recorded.data.metrics),
            params=dict(recorded.data.params),
            model_path=final,
            model_uri=recorded.data.tags.get(MODEL_URI_TAG),
            ui_url=self._ui_url(),
            objective=_objective(cfg, result),
            pruned=pruned,
            tags=dict(recorded.data.tags),
        )

    def _ui_url(self) -> str:
        return ui_url(self.tracker.shown_uri, self.experiment_id, self.run_id)

    def _output_dir(self) -> Path:
        if self.context.output_dir is not None:
            return Path(self.context.output_dir).resolve()
        return Path(tempfile.mkdtemp(prefix="convnets-"))

    def _record_pruned(self, analysis: architecture.Analysis, result) -> None:
        """A trial the search's pruner stopped: a FINISHED run tagged ``pruned=true`` with the
        epochs it completed, and no test metrics (the model is not a final one). Returns the
        best val_accuracy it reached (the sweeper records the trial PRUNED either way)."""
        self.tracker.set_tags({"pruned": "true"})
        self.tracker.log_metrics(
            {
                "param_count": analysis.param_count,
                "receptive_field": analysis.receptive_field,
                "macs": analysis.macs,
                "train_time_s": result.train_time_s,
                "epochs_completed": result.epochs_completed,
            }
        )
        print(
            f"pruned: trial {self.trial.number} stopped after epoch {result.epochs_completed} "
            f"run={self.run_id}",
            flush=True,
        )

    def _run_unrecorded_worker(self, cfg, fit, bundle) -> Run | None:
        """A MultiWorkerMirroredStrategy worker other than the chief: it trains, evaluates and
        saves in lockstep with the chief (those steps are collective) but records nothing, so
        one training is one MLflow run, written by the chief. Only the chief knows the run id,
        so only the chief writes the run's checkpoint (``<run dir>/checkpoints/<run id>``);
        the others write to a scratch directory deleted at the end. ``resume=`` reads the
        chief's checkpoint directory (its ``checkpoint_dir`` tag, checked to be the run's own
        in every process), so across machines it must be on a shared filesystem."""
        from convnets import trainer

        resuming = self.source is not None and self.source.key == "resume"
        with tempfile.TemporaryDirectory(prefix="convnets-worker-") as scratch:
            model, result = fit(
                checkpoint_dir=(
                    _resume_folder(self.source.run, cfg)
                    if resuming
                    else Path(scratch) / "checkpoints"
                ),
                resume=resuming,
            )
            test = trainer.evaluate(model, bundle.test)
            if cfg.tracking.log_model:
                model.save(Path(scratch) / "model.keras")  # the chief's log_model saves too
        print(
            f"done (worker, not recording): test_accuracy={test['accuracy']:.4f}; "
            "the chief records the run",
            flush=True,
        )
        return None

    def _resolve_source(self) -> DictConfig:
        """The config to train: the command line's, or the recorded one of reproduce=/resume=."""
        cfg = self.cfg
        keys = [key for key in ("reproduce", "resume") if cfg.get(key)]
        if not keys:
            return cfg
        if len(keys) == 2:
            raise ConfigError("reproduce= and resume= exclude each other; give one of them")
        key = keys[0]
        run_id = str(cfg[key])
        others, runtime = [], []
        for override in self.overrides:
            name = _override_key(override)
            if name not in ("reproduce", "resume"):
                (runtime if is_runtime_key(name) else others).append(override)
        if others:
            shown = ", ".join(k if "." in k else f"{k}.*" for k in RUNTIME_KEYS)
            raise ConfigError(
                f"{key}={run_id} reruns the recorded config exactly; drop the other overrides "
                f"({' '.join(others)}) -- only the runtime keys (where and how it runs) may "
                f"be given: {shown}"
            )
        self.runtime_overrides = runtime
        self.tracker = self._open_tracker(cfg)
        run = self.tracker.get_run(run_id, key=key)
        if key == "resume" and run_is_finished(run):
            raise TrackingError(
                f"resume={run_id}: the run already FINISHED; nothing to resume "
                f"({command('train')} reproduce={run_id} trains it again as a new run)"
            )
        if key == "resume" and "checkpoint_dir" not in run.data.tags:
            raise TrackingError(
                f"resume={run_id}: the run has no checkpoint_dir tag; cannot resume"
            )
        recorded = self.tracker.load_config(run_id, key=key)
        self.source = _Source(key, run)
        commit, _ = git_state(PACKAGE_DIR)
        recorded_commit = run.data.tags.get("git_commit", "unknown")
        if commit != recorded_commit:
            _warn(f"{key}={run_id} was recorded at git commit {recorded_commit}; this is {commit}")
        diff, _ = git_changes(PACKAGE_DIR.parent)
        recorded_diff = run.data.tags.get("git_diff_sha256")
        if (_sha256(diff) if diff else None) != recorded_diff:
            how = (
                f"its changes are the artifact {CODE_DIFF_ARTIFACT}: mlflow artifacts download "
                f"--run-id {run_id} --artifact-path {CODE_DIFF_ARTIFACT} --dst-path . && git "
                f"checkout {recorded_commit} && git apply {CODE_DIFF_ARTIFACT}"
                if recorded_diff
                else f"it ran on a clean checkout of {recorded_commit}"
            )
            _warn(f"{key}={run_id}: this working tree's changes differ from the run's; {how}")
        rerun = _rerun_config(recorded, cfg, [_override_key(o) for o in runtime])
        if key == "resume":
            _check_resumable(run, rerun)
        return rerun

    def _prepare_store(self, cfg: DictConfig) -> str:
        if self.tracker is None:
            self.tracker = self._open_tracker(cfg)
        if cfg.get("init_from"):
            self.tracker.get_run(str(cfg.init_from), key="init_from")  # a typo fails here
        if self.source is not None and self.source.key == "resume":
            return self.source.run.info.experiment_id
        if self.sweep is not None:
            return self.sweep.experiment_id  # created once by the sweep before the fan-out
        return self.tracker.experiment_id(sweep.experiment_name(cfg))

    def _open_tracker(self, cfg: DictConfig) -> Tracker:
        return open_store(cfg.tracking.uri, http_timeout_s=cfg.tracking.http_timeout_s)

    # ------------------------------------------------------------ the record

    def _run_name(self, cfg: DictConfig) -> str:
        if self.source is not None:
            return f"{self.source.run.info.run_name}-reproduce"
        if cfg.tracking.run_name:
            return redact(str(cfg.tracking.run_name))[:RUN_NAME_LIMIT]
        return run_name(cfg.model.name, cfg.dataset.name, self.overrides, self.sweep)

    def _tags(self, cfg: DictConfig, resuming: bool) -> dict[str, str]:
        runtime = {"runtime_overrides": " ".join(self.runtime_overrides)}
        if resuming:
            return {"resumed": "true", **(runtime if self.runtime_overrides else {})}
        commit, dirty = git_state(PACKAGE_DIR)
        tags = {
            "dataset": cfg.dataset.name,
            "model": cfg.model.name,
            "git_commit": commit,
            "git_dirty": str(dirty).lower() if dirty is not None else "unknown",
            "hydra_overrides": " ".join(self.overrides),
            "config_digest": config_digest(cfg),
            **{f"version.{name}": v for name, v in package_versions().items()},
        }
        if self.source is not None:
            tags["reproduces"] = self.source.run_id
            tags.update(runtime)
        if self.init is not None:
            tags.update(self.init.tags())
        if self.sweep is not None:
            tags.update(self.sweep.tags())
        return tags

    def _log_definition(self, cfg: DictConfig, analysis: architecture.Analysis, bundle) -> None:
        """Params, config.yaml, the per-layer table and the data it reads (a digest per split,
        as tags and as MLflow dataset inputs): what the run is, before it trains."""
        from convnets import data

        resolved = _recordable(cfg)
        self.tracker.log_params(flatten(resolved))
        self.tracker.log_text(OmegaConf.to_yaml(resolved), CONFIG_ARTIFACT)
        self.tracker.log_text(architecture.format_table(analysis) + "\n", "layers.txt")
        self.tracker.log_dict(architecture.analysis_to_dict(analysis), "layers.json")
        # Also as params and tags: MLflow's charts group and colour runs by those, not metrics.
        shape = {"receptive_field": analysis.receptive_field, "depth": len(cfg.model.layers)}
        self.tracker.log_params(shape)
        self.tracker.set_tags(shape)
        self._log_code_changes()
        self.tracker.set_tags({f"data_digest.{split}": d for split, d in bundle.digests.items()})
        sizes = {"train": bundle.num_train, "validation": bundle.num_val, "test": bundle.num_test}
        self.tracker.log_data_inputs(
            self.run_id,
            name=cfg.dataset.name,
            source=data.data_source(cfg.dataset),
            splits={split: (d, sizes[split]) for split, d in bundle.digests.items()},
        )

    def _log_code_changes(self) -> None:
        """A dirty tree's changes against its commit, so the run can be rerun on that code:
        ``git diff HEAD`` as ``code/git_diff.patch`` (its sha256 as the tag
        ``git_diff_sha256``) and the untracked files under the package as a tag."""
        diff, untracked = git_changes(PACKAGE_DIR.parent)
        if diff:
            self.tracker.log_text(diff, CODE_DIFF_ARTIFACT)
            self.tracker.set_tags({"git_diff_sha256": _sha256(diff)})
        package_files = [f for f in untracked if f.startswith(f"{PACKAGE_DIR.name}/")]
        if package_files:
            self.tracker.set_tags({"git_untracked": " ".join(package_files)[:5000]})

    def _epoch_recorder(self, resuming: bool) -> Callable[[int, Mapping[str, float]], bool]:
        """The trainer's ``after_epoch``: each epoch's metrics to MLflow in one store call
        (nothing per batch); in a search, also to the job's Optuna trial, whose pruner may
        stop training (returns True)."""
        logged: set[int] = set()
        if resuming:
            # Epochs committed to the checkpoint but killed before they reached MLflow.
            logged = self.tracker.logged_steps(self.run_id)
            state = checkpoints.read_state(self.checkpoint_dir) or {}
            for epoch_logs in state.get("history", []):
                if epoch_logs["epoch"] not in logged:
                    self.tracker.log_epoch(self.run_id, epoch_logs["epoch"], epoch_logs)
                    logged.add(epoch_logs["epoch"])

        def record(epoch: int, logs: Mapping[str, float]) -> bool:
            if epoch not in logged:
                self.tracker.log_epoch(self.run_id, epoch, logs)
            return self.trial is not None and self.trial.report(epoch, logs)

        return record

    def _log_results(self, cfg, model, bundle, analysis, result) -> dict[str, float]:
        from convnets import erf, plots, trainer

        test = trainer.evaluate(model, bundle.test)
        measured_erf = erf.effective_receptive_field(model, bundle.test)
        if measured_erf.side >= max(bundle.input_shape[:2]):  # it cannot grow any more
            self.tracker.set_tags({"erf_saturated": "true"})
        metrics = {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "param_count": analysis.param_count,
            "receptive_field": analysis.receptive_field,
            "macs": analysis.macs,
            "effective_receptive_field": measured_erf.side,
            "train_time_s": result.train_time_s,
            "images_per_sec": result.images_per_sec,
            "epochs_completed": result.epochs_completed,
        }
        if result.startup_s is not None:
            metrics["startup_s"] = result.startup_s  # process start -> first train step
        if result.best_epoch is not None:
            metrics["best_epoch"] = result.best_epoch
            metrics["best_val_accuracy"] = result.best_val_accuracy
            self.tracker.set_tags({"best_epoch_criterion": trainer.BEST_EPOCH_CRITERION})
        if self.source is not None and self.source.key == "reproduce":
            metrics.update(self._reproduce_deltas(cfg, test, bundle))
        self.tracker.log_metrics(metrics)
        if self.trial is not None:  # the search's objectives
            self.trial.finish({**metrics, "val_accuracy": _objective(cfg, result)})
        figure = plots.training_curves(self.tracker.history(self.run_id))
        self.tracker.log_figure(figure, "training_curves.png")
        return test

    def _log_model(self, cfg, model, bundle, run_name: str) -> None:
        """The model as a LoggedModel named after the run, with a few raw test images as its
        input example and the normalisation it applies itself as metadata."""
        images = next(iter(bundle.test.unbatch().batch(INPUT_EXAMPLE_IMAGES)))[0]
        model_uri, model_id = self.tracker.log_model(
            model,
            name=run_name,
            input_example=images.numpy().astype(SERVED_DTYPE),
            metadata={
                "input": (
                    f"{cfg.dataset.name} pixel values as stored ({bundle.pixel_dtype} "
                    f"0..{bundle.max_pixel_value:g}), given as float32, shape "
                    f"{list(bundle.input_shape)}; not normalised: the model normalises them "
                    "itself, and reads any float as a pixel value"
                ),
                "max_pixel_value": bundle.max_pixel_value,
                "mean": list(bundle.mean),
                "std": list(bundle.std),
                "class_names": list(bundle.class_names),
            },
        )
        self.tracker.set_tags({MODEL_URI_TAG: model_uri, "model_id": model_id})

    def _reproduce_deltas(
        self, cfg: DictConfig, test: Mapping[str, float], bundle: data.DataBundle
    ) -> dict[str, float]:
        num_test, digests = bundle.num_test, bundle.digests
        original = self.source.run.data.metrics
        if "test_accuracy" not in original or "test_loss" not in original:
            _warn(f"reproduce={self.source.run_id} has no test metrics to compare with")
            return {}
        deltas = {
            "reproduce_delta_test_accuracy": test["accuracy"] - original["test_accuracy"],
            "reproduce_delta_test_loss": test["loss"] - original["test_loss"],
        }
        recorded_digests = {
            split: self.source.run.data.tags.get(f"data_digest.{split}") for split in digests
        }
        changed = [s for s, d in digests.items() if recorded_digests[s] not in (None, d)]
        if changed:
            _warn(
                f"reproduce={self.source.run_id}: the data differs from the original's "
                f"({', '.join(changed)} digest changed): a different result is expected"
            )
        verdict = reproduce_verdict(
            deltas["reproduce_delta_test_accuracy"],
            deltas["reproduce_delta_test_loss"],
            original["test_accuracy"],
            num_test,
            deterministic=bool(cfg.trainer.deterministic),
            data_changed=changed,
        )
        self.tracker.set_tags({"reproduce_verdict": verdict})
        print(
            f"reproduce {self.source.run_id}: {verdict} "
            f"(delta test_accuracy={deltas['reproduce_delta_test_accuracy']:+.6g}, "
            f"delta test_loss={deltas['reproduce_delta_test_loss']:+.6g})",
            flush=True,
        )
        return deltas

    def _print_summary(self, cfg, test, analysis, result) -> None:
        """The last line of output: the numbers, and the URLs that open the run and the
        experiment's runs table (MLflow 3 opens an experiment on its GenAI overview page)."""
        where = where_to_look(self.tracker.shown_uri, self.experiment_id, self.run_id)
        print(
            f"done: test_accuracy={test['accuracy']:.4f} params={analysis.param_count:,} "
            f"receptive_field={analysis.receptive_field}px time={result.train_time_s:.1f}s "
            f"run={self.run_id} ({where})",
            flush=True,
        )

    @contextlib.contextmanager
    def _out_of_space_continues(self):
        """A full disk while the run records (a checkpoint, an artifact, the model) is one
        :class:`DiskFull` line, which the run also ends FAILED with: the file it could not
        write (its partial copy already removed), the epoch its checkpoint keeps, and the
        command that continues the run once there is space."""
        try:
            yield
        except Exception as err:
            if not isinstance(err, DiskFull) and not out_of_space(err):
                raise
            path = getattr(err, "path", None) or getattr(err, "filename", None) or "a file"
            state = checkpoints.read_state(self.checkpoint_dir) if self.checkpoint_dir else None
            kept = (
                f"its checkpoint keeps epoch {state['epoch']} in {self.checkpoint_dir}"
                if state
                else "no epoch was committed yet"
            )
            raise DiskFull(
                path,
                f"; run {self.run_id} recorded FAILED, {kept}; free space there, then "
                f"continue with: {self.resume_command()}",
            ) from err

    def resume_command(self) -> str:
        """The command that continues this run, with the store when it is not the default
        (else following it would open an empty ``mlflow.db``); the URI shown redacted."""
        hint = f"{command('train')} resume={self.run_id}"
        uri = self.cfg.tracking.uri
        if uri != TrackingConfig.uri:
            hint += f" {shell_override('tracking.uri', redact(uri))}"
        return hint

    def record_failure(self, err: Exception) -> None:
        """In a multirun, a job that failed before its run started still leaves a FAILED run."""
        if self.run_id is not None:
            return  # the run's context manager recorded it
        try:
            tracker = self.tracker or self._open_tracker(self.cfg)
            if self.sweep is not None:
                experiment_id = self.sweep.experiment_id
            else:
                experiment_id = tracker.experiment_id(sweep.experiment_name(self.cfg))
            self.run_id = tracker.create_run(
                experiment_id,
                run_name=run_name(
                    self.cfg.model.name, self.cfg.dataset.name, self.overrides, self.sweep
                ),
                tags=self.sweep.tags() if self.sweep is not None else {},
                parent_run_id=self.sweep.parent_run_id if self.sweep is not None else None,
            )
            tracker.log_params_to(self.run_id, flatten(_recordable(self.cfg)))
            tracker.end_run(self.run_id, "FAILED", failure_reason(err))
        except Exception:  # noqa: BLE001 - the store may be what failed; the job's error matters
            log.warning("the failed job could not be recorded in MLflow", exc_info=True)


# ---------------------------------------------------------------- helpers


def run_name(
    model: str,
    dataset: str,
    overrides: Sequence[str],
    sweep_context: sweep.SweepContext | None = None,
) -> str:
    """The name of a run: short enough for MLflow's UI (at most :data:`RUN_NAME_LIMIT`
    characters, cut with a marker; the full overrides are the ``hydra_overrides`` and
    ``sweep_overrides`` tags) and distinct within a sweep.

    A sweep's job (``sweep_context`` given): its number, then what its sweep varies,
    shortened, e.g. ``j03 k=5 d=2`` or ``t05 lr=5.5e-3 k=3 w=1`` for a search's trial
    (:func:`convnets.sweep.job_run_name`). Otherwise model, dataset and the overrides that
    differ: ``simple_cnn-digits-kernel_size=5,width=2``.
    """
    if sweep_context is not None:
        return sweep.job_run_name(sweep_context)
    parts = []
    for override in overrides:
        key = _override_key(override)
        if key in _NOT_IN_NAME or key.startswith("tracking."):
            continue
        short = key.split(".", 1)[-1].removeprefix("layer_defaults.")
        parts.append(f"{short}={override.split('=', 1)[1]}" if "=" in override else short)
    words = [f"{model}-{dataset}", *parts]
    if parts:  # simple_cnn-digits-kernel_size=5,width=2
        words[:2] = [f"{words[0]}-{words[1]}"]
    return sweep.fit_name([redact(word) for word in words], ",", RUN_NAME_LIMIT)


def reproduce_verdict(
    delta_accuracy: float,
    delta_loss: float,
    accuracy: float,
    num_test: int,
    *,
    deterministic: bool = True,
    data_changed: Sequence[str] = (),
) -> str:
    """identical (bit for bit) / within noise (accuracy within 2 binomial standard errors of
    the original's on ``num_test`` images) / differs; qualified when the original was not
    deterministic (bit-identity was not expected) and when the data's digest changed."""
    if delta_accuracy == 0 and delta_loss == 0:
        verdict = "identical"
    else:
        noise = 2 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(num_test, 1))
        verdict = "within noise" if abs(delta_accuracy) <= noise else "differs"
    notes = []
    if not deterministic:
        notes.append("bit-identity not expected: the original ran with trainer.deterministic=false")
    if data_changed:
        notes.append(f"the data differs: {', '.join(data_changed)} digest changed")
    return f"{verdict} ({'; '.join(notes)})" if notes else verdict


def _check_architecture_and_data(cfg: DictConfig):
    from convnets import data

    checks.check_config(cfg)
    stack = architecture.resolve_stack(cfg.model)
    data.check_available(cfg.dataset)
    input_shape, num_classes = data.dataset_shape(cfg.dataset)
    analysis = architecture.analyze(stack, input_shape, num_classes)
    for warning in analysis.warnings:
        _warn(warning)
    memory = checks.check_memory(analysis, cfg.trainer.batch_size)
    if memory is not None:
        _warn(memory)
    if cfg.trainer.restore_best and cfg.dataset.val_fraction == 0:
        _warn(
            "trainer.restore_best=true with dataset.val_fraction=0: there is no validation "
            "split to choose an epoch by, so the last epoch's weights are tested; set "
            "trainer.restore_best=false (or a val_fraction > 0)"
        )
    return stack, input_shape, num_classes, analysis


def _rerun_config(recorded: DictConfig, current: DictConfig, runtime: Sequence[str]) -> DictConfig:
    """The recorded config, checked against today's schema, recorded where the user says now,
    with the runtime keys given on this command line (``runtime``) taken from it."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), recorded)
    except Exception as err:  # noqa: BLE001 - OmegaConf's validation errors
        raise ConfigError(
            f"the recorded {CONFIG_ARTIFACT} no longer fits the config schema ({err}); "
            "check out the run's git_commit and rerun from there"
        ) from err
    cfg.tracking = current.tracking
    for key in runtime:
        OmegaConf.update(cfg, key, OmegaConf.select(current, key), merge=False)
    return cfg


def config_digest(cfg: DictConfig) -> str:
    """sha256 of what is trained: the recorded config without the runtime keys
    (:data:`convnets.config.RUNTIME_KEYS`), so it holds on another machine."""
    trained = {
        key: value for key, value in flatten(_recordable(cfg)).items() if not is_runtime_key(key)
    }
    return hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()


def _check_resumable(run: MlflowRun, cfg: DictConfig) -> None:
    """Refuse to resume a run from a checkpoint that cannot continue it, in one line."""
    run_id = run.info.run_id
    if not cfg.trainer.checkpoint_every_epoch:
        raise TrackingError(
            f"resume={run_id}: the run was trained with trainer.checkpoint_every_epoch=false, "
            f"so no epoch can be continued; {command('train')} reproduce={run_id} trains it "
            "again as a new run"
        )
    checkpoint_dir = _resume_folder(run, cfg)
    if not checkpoint_dir.is_dir():
        raise TrackingError(
            f"resume={run_id}: its checkpoint folder {checkpoint_dir} is not on this machine "
            "(the run trained elsewhere, or the folder was deleted); copy the folder here and "
            f"add checkpoint_dir=<the copy>, or train the run again as a new run with "
            f"reproduce={run_id}"
        )
    # Under multi_worker every worker of this resume reads the folder the chief is about to hold.
    holder = (
        None
        if cfg.distribute.strategy == "multi_worker"
        else checkpoints.live_holder(checkpoint_dir)
    )
    if holder is not None:
        raise TrackingError(
            f"resume={run_id}: the run is still training: {holder} holds {checkpoint_dir}; "
            f"stop it first (if that process is gone for good, delete "
            f"{checkpoint_dir / checkpoints.LOCK_FILE})"
        )
    state = checkpoints.read_state(checkpoint_dir)
    if state is None:
        return  # killed before its first epoch ended: it starts from epoch 1, nothing to splice
    checkpoints.verify(checkpoint_dir, state)  # before TensorFlow loads anything
    owner = state.get("run_id")
    if owner != run_id or state.get("config_digest") != config_digest(cfg):
        whose = f"run {owner}" if owner and owner != run_id else "another training"
        raise TrackingError(
            f"resume={run_id}: the checkpoint in {checkpoint_dir} belongs to {whose}, not to "
            f"this run (its {checkpoints.STATE_FILE} says so); refusing to continue from it "
            f"({command('train')} reproduce={run_id} trains the run again as a new run)"
        )


def _resume_folder(run: MlflowRun, cfg: DictConfig) -> Path:
    """Where resume= reads the run's checkpoint: ``checkpoint_dir=`` (a copy), else its tag."""
    return Path(cfg.get("checkpoint_dir") or run.data.tags["checkpoint_dir"]).expanduser()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _recordable(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as recorded (params, config.yaml): no run ids, no credentials."""
    resolved = _drop_unset(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    resolved.pop("reproduce", None)
    resolved.pop("resume", None)
    resolved.pop("checkpoint_dir", None)  # where this machine keeps a copy: not what is trained
    resolved["tracking"]["uri"] = redact(resolved["tracking"]["uri"])
    return resolved


def _drop_unset(tree: Any) -> Any:
    """Leave out per-layer fields left ``???`` (they fall back to ``model.layer_defaults``)."""
    if isinstance(tree, dict):
        return {k: _drop_unset(v) for k, v in tree.items() if v != "???"}
    if isinstance(tree, list):
        return [_drop_unset(v) for v in tree]
    return tree


def _objective(cfg: DictConfig, result: trainer.FitResult) -> float:
    if cfg.trainer.restore_best and result.best_val_accuracy is not None:
        return float(result.best_val_accuracy)
    values = result.history.get("val_accuracy") or []
    return float(values[-1]) if values else float("nan")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
