"""One training job: a :class:`~convnets.plan.Plan` run, recorded, returned as a :class:`Run`.

:func:`train` takes a composed config and a :class:`JobContext` (the overrides, the output
folder, the sweep and search the job belongs to), plans it (:mod:`convnets.plan`: every check
that needs no TensorFlow, so bad input costs seconds and records nothing), runs it, and
records it through a :class:`~convnets.recording.Recorder` (MLflow at ``tracking.uri`` unless
the caller gives another). Its callers own the process and Hydra: ``python train.py`` (the
context read from Hydra's state) and :func:`convnets.train`. Nothing here reads Hydra's
globals. TensorFlow-backed modules are imported inside the steps that use them.

Epochs are numbered from 1 in the record (metric step = epoch), as in Keras's progress output.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from convnets import architecture, checkpoints, checks, sweep
from convnets.config import flatten
from convnets.errors import (
    ConvnetsError,
    DiskFull,
    Interrupted,
    command,
    out_of_space,
    shell_override,
    warn,
)
from convnets.plan import (
    CODE_DIFF_ARTIFACT,
    PACKAGE_DIR,
    JobContext,
    Plan,
    config_digest,
    make_plan,
    recordable,
    run_name,
    sha256,
)
from convnets.recording import Definition, MlflowRecorder, Recorder, resume_command
from convnets.tracking import (
    CONFIG_ARTIFACT,
    MODEL_URI_TAG,
    absolute_uri,
    failure_reason,
    git_changes,
)

if TYPE_CHECKING:
    import keras

    from convnets import data, trainer, transfer

__all__ = ["JobContext", "Run", "config_digest", "reproduce_verdict", "run_name", "train"]

log = logging.getLogger(__name__)

INPUT_EXAMPLE_IMAGES = 4  # raw test images logged with the model as its input example
# What the logged model's signature takes: the Keras model's own input dtype. With the stored
# dtype (uint8) in the signature, MLflow's REST server casts posted floats to it, so a request
# of normalised 0..1 floats was silently answered for an all-zero image.
SERVED_DTYPE = "float32"


@dataclass(frozen=True)
class Run:
    """A finished training run, as recorded.

    ``objective``: the run's ``selected_val_accuracy``, the validation accuracy of the epoch
    whose weights are tested and logged (``nan`` without validation data).
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


def train(
    cfg: DictConfig, context: JobContext | None = None, recorder: Recorder | None = None
) -> Run | None:
    """Plan, train and record one run; return it.

    ``recorder``: where the run is recorded (default: MLflow at ``cfg.tracking.uri``; a
    :class:`~convnets.recording.MemoryRecorder` keeps it in this process). In a multirun a
    failing job is recorded FAILED, reported in one ``error:`` line, and returns ``None`` so
    the other jobs still run; otherwise the error propagates (a :class:`ConvnetsError` for
    anything the user can fix). Ctrl-C ends the run KILLED, says how to continue it, and
    re-raises ``KeyboardInterrupt``.
    """
    context = context or JobContext()
    if recorder is None:
        recorder = MlflowRecorder(
            cfg.tracking.uri,
            http_timeout_s=cfg.tracking.http_timeout_s,
            outage_wait_s=cfg.tracking.outage_wait_s,
        )
    job = _Job(cfg, context, recorder)
    try:
        return job.run()
    except KeyboardInterrupt as err:
        by = f" by {err}" if isinstance(err, Interrupted) else ""
        if job.run_id is None:  # stopped while starting: no run of this job was opened
            print(f"interrupted{by} before the run was recorded: nothing recorded", file=sys.stderr)
            raise
        where = f"; checkpoint kept in {job.checkpoint_dir}" if job.checkpoint_dir else ""
        hint = (
            "; rerun the search's command to continue its study (it asks this trial again)"
            if context.sweep is not None and context.sweep.search
            else f"; continue with: {job.resume_command()}"
        )
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


class _Job:
    """Runs a plan: TensorFlow, the data and the strategy, the fit, the results; each step
    told to the recorder as it happens."""

    def __init__(self, cfg: DictConfig, context: JobContext, recorder: Recorder):
        self.cfg = cfg
        self.context = context
        self.recorder = recorder
        self.trial = context.trial  # set in a search: its Optuna trial (convnets.search)
        self.plan: Plan | None = None
        self.run_id: str | None = None
        self.checkpoint_dir: Path | None = None
        self.init: transfer.Transfer | None = None

    def run(self) -> Run:
        plan = self.plan = make_plan(self.cfg, self.context, self.recorder)  # no TensorFlow yet
        cfg = plan.cfg
        from convnets import data, distribute, trainer, transfer
        from convnets.model import PixelScaling, build_model

        if self.context.libraries_loaded is not None:
            self.context.libraries_loaded()
        distribute.configure_devices(cfg.distribute)  # before TF touches its devices
        trainer.seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
        trainer.set_precision(cfg.trainer.precision)
        strategy = distribute.make_strategy(cfg.distribute)
        checks.check_replicas(  # the devices are known only now (e.g. GPUs under auto)
            cfg.trainer, strategy.num_replicas_in_sync, "the devices of this machine"
        )
        print(f"devices: {distribute.describe(strategy)}", flush=True)
        bundle = data.load_data(
            cfg.dataset,
            batch_size=cfg.trainer.batch_size,
            seed=cfg.trainer.seed,
            deterministic=cfg.trainer.deterministic,
            replicas=strategy.num_replicas_in_sync,
        )
        if bundle.train_dropped_per_epoch:
            print(
                f"each epoch leaves out its last {bundle.train_dropped_per_epoch} training "
                f"image(s): that batch would give a replica none (a different few each epoch)",
                flush=True,
            )

        def build() -> keras.Model:
            model = build_model(
                plan.stack,
                plan.input_shape,
                plan.num_classes,
                pixel_scaling=PixelScaling(bundle.max_pixel_value, bundle.mean, bundle.std),
                sync_batch_norm=cfg.distribute.sync_batch_norm,
            )
            return self.init.apply(model) if self.init is not None else model

        if cfg.get("init_from"):  # every worker copies the same weights into its model
            self.init = transfer.plan(
                _tracker_of(self.recorder),
                str(cfg.init_from),
                build(),
                cfg.trainer.freeze_layers,
                bundle.class_names,
            )

        fit = functools.partial(
            trainer.fit,
            build,
            bundle,
            cfg.trainer,
            cfg.optimizer,
            strategy,
            stop_requested=self.context.stop_requested,
        )
        if not strategy.extended.should_checkpoint:
            return self._run_unrecorded_worker(fit, bundle)

        if plan.resuming:
            self.checkpoint_dir = plan.resume_folder
        tags = plan.tags()
        if self.init is not None and not plan.resuming:
            tags.update(self.init.tags())
        with self.recorder.run(plan, tags) as run_id, self._out_of_space_continues():
            self.run_id = run_id
            if not plan.resuming:
                # Keyed by the run id: runs sharing a Hydra run dir never touch each other's.
                self.checkpoint_dir = plan.output_dir() / "checkpoints" / run_id
                self.recorder.set_tags({"checkpoint_dir": str(self.checkpoint_dir)})
                self.recorder.log_definition(definition(plan, bundle))
            elif plan.source.run.data.tags.get("checkpoint_dir") != str(self.checkpoint_dir):
                # resumed from a copy (checkpoint_dir=): the run's files are there from now on
                self.recorder.set_tags({"checkpoint_dir": str(self.checkpoint_dir)})
            self.recorder.set_folder(self.checkpoint_dir)
            if self.trial is not None:
                self.trial.start(run_id)
            with checkpoints.held(self.checkpoint_dir):  # resume= refuses while this trains
                model, result = fit(
                    checkpoint_dir=self.checkpoint_dir,
                    after_epoch=self._epoch_recorder(plan.resuming),
                    resume=plan.resuming,
                    identity={"run_id": run_id, "config_digest": config_digest(cfg)},
                )
            if self.trial is not None and self.trial.pruned:
                self._record_pruned(result)
                return self._recorded(result, None, pruned=True)
            self._stop_if_requested()  # a stop after the last step: the run ends KILLED
            test = self._log_results(model, bundle, result)
            self._stop_if_requested()
            if cfg.tracking.log_model:  # after the results: MLflow links them to the model
                self._log_model(model, bundle)
                self._stop_if_requested()
            final = trainer.save_final_model(
                model, self.checkpoint_dir, OmegaConf.to_yaml(recordable(cfg))
            )
        evaluate = f"{command('evaluate')} {shell_override('checkpoint', final)}"
        print(f"model: {final} ({evaluate})", flush=True)
        self._print_summary(test, result)
        return self._recorded(result, final)

    def _stop_if_requested(self) -> None:
        """Between the steps after training, the stop signal whose exception Python dropped
        (raised inside a finalizer: see :func:`convnets.cli.stop_requested`), raised now;
        training itself checks after every batch."""
        if self.context.stop_requested is not None:
            from convnets.trainer import raise_stop

            raise_stop(self.context.stop_requested())

    def _recorded(self, result, final: Path | None, pruned=False) -> Run:
        """The finished run as its record has it now (metrics, params and tags read back)."""
        recorded = self.recorder.recorded()
        objective = recorded.metrics.get("selected_val_accuracy")
        if objective is None:  # a pruned run logs none: its epochs so far say it
            objective = _selected_val_accuracy(self.plan.cfg, result, result.history)
        return Run(
            run_id=self.run_id,
            experiment_id=self.plan.experiment_id,
            tracking_uri=absolute_uri(self.recorder.shown_uri),  # a notebook may change folder
            metrics=recorded.metrics,
            params=recorded.params,
            model_path=final,
            model_uri=recorded.model_uri,
            ui_url=self.recorder.ui_url(self.plan.experiment_id, self.run_id),
            objective=math.nan if objective is None else objective,
            pruned=pruned,
            tags=recorded.tags,
        )

    def _run_unrecorded_worker(self, fit, bundle) -> Run | None:
        """A MultiWorkerMirroredStrategy worker other than the chief: it trains, evaluates and
        saves in lockstep with the chief (those steps are collective) but records nothing, so
        one training is one run, recorded by the chief. Only the chief knows the run id,
        so only the chief writes the run's checkpoint (``<run dir>/checkpoints/<run id>``);
        the others write to a scratch directory deleted at the end. ``resume=`` reads the
        chief's checkpoint directory (its ``checkpoint_dir`` tag, checked to be the run's own
        in every process), so across machines it must be on a shared filesystem."""
        from convnets import trainer

        plan = self.plan
        with tempfile.TemporaryDirectory(prefix="convnets-worker-") as scratch:
            model, result = fit(
                checkpoint_dir=plan.resume_folder or Path(scratch) / "checkpoints",
                resume=plan.resuming,
            )
            test = trainer.evaluate(model, bundle.test)
            if plan.cfg.tracking.log_model:
                model.save(Path(scratch) / "model.keras")  # the chief's log_model saves too
        print(
            f"done (worker, not recording): test_accuracy={test['accuracy']:.4f}; "
            "the chief records the run",
            flush=True,
        )
        return None

    # ------------------------------------------------------------ the record

    def _epoch_recorder(self, resuming: bool) -> Callable[[int, Mapping[str, float]], bool]:
        """The trainer's ``after_epoch``: each epoch's metrics to the record in one call
        (nothing per batch); in a search, also to the job's Optuna trial, whose pruner may
        stop training (returns True)."""
        logged: set[int] = set()
        if resuming:
            # Epochs committed to the checkpoint but killed before they reached the record.
            logged = self.recorder.logged_epochs()
            state = checkpoints.read_state(self.checkpoint_dir) or {}
            for epoch_logs in state.get("history", []):
                if epoch_logs["epoch"] not in logged:
                    self.recorder.log_epoch(epoch_logs["epoch"], epoch_logs)
                    logged.add(epoch_logs["epoch"])

        def record(epoch: int, logs: Mapping[str, float]) -> bool:
            if epoch not in logged:
                self.recorder.log_epoch(epoch, logs)
            return self.trial is not None and self.trial.report(epoch, logs)

        return record

    def _record_pruned(self, result) -> None:
        """A trial the search's pruner stopped: a FINISHED run tagged ``pruned=true`` with the
        epochs it completed, and no test metrics (the model is not a final one)."""
        analysis = self.plan.analysis
        self.recorder.set_tags({"pruned": "true"})
        self.recorder.log_metrics(
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

    def _log_results(self, model, bundle, result) -> dict[str, float]:
        from convnets import erf, plots, trainer

        cfg, analysis = self.plan.cfg, self.plan.analysis
        test = trainer.evaluate(model, bundle.test)
        measured_erf = erf.effective_receptive_field(model, bundle.test)
        if measured_erf.side >= max(bundle.input_shape[:2]):  # it cannot grow any more
            self.recorder.set_tags({"erf_saturated": "true"})
        metrics = {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "param_count": analysis.param_count,
            "receptive_field": analysis.receptive_field,
            "macs": analysis.macs,
            "train_time_s": result.train_time_s,
            "images_per_sec": result.images_per_sec,
            "epochs_completed": result.epochs_completed,
        }
        if measured_erf.side:
            metrics["effective_receptive_field"] = measured_erf.side
        else:  # no gradient reaches the input: undefined, not 0 px
            self.recorder.set_tags({"erf_undefined": erf.UNDEFINED})
        if result.startup_s is not None:
            metrics["startup_s"] = result.startup_s  # process start -> first train step
        if result.best_epoch is not None:
            metrics["best_epoch"] = result.best_epoch
            metrics["best_val_accuracy"] = result.best_val_accuracy
            self.recorder.set_tags({"best_epoch_criterion": trainer.BEST_EPOCH_CRITERION})
        history = self.recorder.history()  # every epoch, a resumed run's earlier ones too
        selected = _selected_val_accuracy(cfg, result, history)
        if selected is not None:
            metrics["selected_val_accuracy"] = selected
        if self.plan.reproducing:
            metrics.update(self._reproduce_deltas(test, bundle))
        self.recorder.log_metrics(metrics)
        if self.trial is not None:  # the search's objectives, each under its own name
            last = history.get("val_accuracy") or [math.nan]
            self.trial.finish({**metrics, "val_accuracy": last[-1]})
        figure = plots.training_curves(history)
        self.recorder.log_figure(figure, "training_curves.png")
        return test

    def _log_model(self, model, bundle) -> None:
        """The model as a LoggedModel named after the run, with a few raw test images as its
        input example and the normalisation it applies itself as metadata."""
        cfg = self.plan.cfg
        images = next(iter(bundle.test.unbatch().batch(INPUT_EXAMPLE_IMAGES)))[0]
        model_uri, model_id = self.recorder.log_model(
            model,
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
        self.recorder.set_tags({MODEL_URI_TAG: model_uri, "model_id": model_id})

    def _reproduce_deltas(
        self, test: Mapping[str, float], bundle: data.DataBundle
    ) -> dict[str, float]:
        source, cfg = self.plan.source, self.plan.cfg
        num_test, digests = bundle.num_test, bundle.digests
        original = source.run.data.metrics
        if "test_accuracy" not in original or "test_loss" not in original:
            warn(f"reproduce={source.run_id} has no test metrics to compare with")
            return {}
        deltas = {
            "reproduce_delta_test_accuracy": test["accuracy"] - original["test_accuracy"],
            "reproduce_delta_test_loss": test["loss"] - original["test_loss"],
        }
        recorded_digests = {
            split: source.run.data.tags.get(f"data_digest.{split}") for split in digests
        }
        changed = [s for s, d in digests.items() if recorded_digests[s] not in (None, d)]
        if changed:
            warn(
                f"reproduce={source.run_id}: the data differs from the original's "
                f"({', '.join(changed)} digest changed): a different result is expected"
            )
        verdict = reproduce_verdict(
            deltas["reproduce_delta_test_accuracy"],
            deltas["reproduce_delta_test_loss"],
            original["test_accuracy"],
            num_test,
            deterministic=bool(cfg.trainer.deterministic),
            data_changed=changed,
            resumed=source.run.data.tags.get("resumed") == "true",
        )
        self.recorder.set_tags({"reproduce_verdict": verdict})
        print(
            f"reproduce {source.run_id}: {verdict} "
            f"(delta test_accuracy={deltas['reproduce_delta_test_accuracy']:+.6g}, "
            f"delta test_loss={deltas['reproduce_delta_test_loss']:+.6g})",
            flush=True,
        )
        return deltas

    def _print_summary(self, test, result) -> None:
        """The last line of output: the numbers, and where to see the run (for MLflow, the
        URLs that open the run and the experiment's runs table)."""
        analysis = self.plan.analysis
        where = self.recorder.where_to_look(self.plan.experiment_id, self.run_id)
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
        return resume_command(self.run_id, self.cfg.tracking.uri)

    def record_failure(self, err: Exception) -> None:
        """In a multirun, a job that failed before its run started still leaves a FAILED run."""
        if self.run_id is not None:
            return  # the run's recorder ended it
        sweep_context = self.context.sweep
        try:
            if sweep_context is not None:
                experiment_id = sweep_context.experiment_id
            else:
                experiment_id = self.recorder.experiment_id(sweep.experiment_name(self.cfg))
            self.run_id = self.recorder.failed_job(
                experiment_id,
                run_name(self.cfg.model.name, self.cfg.dataset.name, self.context.overrides,
                         sweep_context),
                sweep_context.tags() if sweep_context is not None else {},
                sweep_context.parent_run_id if sweep_context is not None else None,
                flatten(recordable(self.cfg)),
                failure_reason(err),
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - the store may be what failed; the job's error matters
            log.warning("the failed job could not be recorded", exc_info=True)


# ---------------------------------------------------------------- helpers


def definition(plan: Plan, bundle: data.DataBundle) -> Definition:
    """What the run is, before it trains: params, ``config.yaml``, the per-layer table, its
    receptive field and depth (also as params and tags: MLflow's charts group and colour runs
    by those, not by metrics), a dirty tree's changes, and the data it reads (a digest per
    split, as tags and as dataset inputs)."""
    from convnets import data

    cfg, analysis = plan.cfg, plan.analysis
    resolved = recordable(cfg)
    shape = {"receptive_field": analysis.receptive_field, "depth": len(cfg.model.layers)}
    texts = {
        CONFIG_ARTIFACT: OmegaConf.to_yaml(resolved),
        "layers.txt": architecture.format_table(analysis) + "\n",
    }
    tags = {**shape, **{f"data_digest.{split}": d for split, d in bundle.digests.items()}}
    if bundle.train_dropped_per_epoch:  # the last batch would have left a replica empty
        tags["train_dropped_per_epoch"] = str(bundle.train_dropped_per_epoch)
    # A dirty tree's changes against its commit, so the run can be rerun on that code:
    # ``git diff HEAD`` as an artifact (its sha256 as a tag), and the untracked files under
    # the package as a tag.
    diff, untracked = git_changes(PACKAGE_DIR.parent)
    if diff:
        texts[CODE_DIFF_ARTIFACT] = diff
        tags["git_diff_sha256"] = sha256(diff)
    package_files = [f for f in untracked if f.startswith(f"{PACKAGE_DIR.name}/")]
    if package_files:
        tags["git_untracked"] = " ".join(package_files)[:5000]
    sizes = {"train": bundle.num_train, "validation": bundle.num_val, "test": bundle.num_test}
    return Definition(
        params={**flatten(resolved), **shape},
        texts=texts,
        dicts={"layers.json": architecture.analysis_to_dict(analysis)},
        tags=tags,
        data_name=cfg.dataset.name,
        data_source=data.data_source(cfg.dataset),
        splits={split: (d, sizes[split]) for split, d in bundle.digests.items()},
    )


def _tracker_of(recorder: Recorder):
    """The MLflow store behind ``recorder``: ``init_from`` downloads a logged model from it."""
    tracker = getattr(recorder, "tracker", None)
    if tracker is None:
        from convnets.errors import ConfigError

        raise ConfigError("init_from= loads a model logged in MLflow: record with MLflow")
    return tracker


def reproduce_verdict(
    delta_accuracy: float,
    delta_loss: float,
    accuracy: float,
    num_test: int,
    *,
    deterministic: bool = True,
    data_changed: Sequence[str] = (),
    resumed: bool = False,
) -> str:
    """identical (bit for bit) / within noise (accuracy within 2 binomial standard errors of
    the original's on ``num_test`` images) / differs; qualified when the original was not
    deterministic or was resumed (bit-identity was not expected) and when the data's digest
    changed."""
    if delta_accuracy == 0 and delta_loss == 0:
        verdict = "identical"
    else:
        noise = 2 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(num_test, 1))
        verdict = "within noise" if abs(delta_accuracy) <= noise else "differs"
    notes = []
    # "identical (bit-identity not expected ...)" read as a contradiction: it was, by luck.
    expected = (
        "so, though not guaranteed" if verdict == "identical" else "bit-identity not expected"
    )
    if not deterministic:
        notes.append(f"{expected}: the original ran with trainer.deterministic=false")
    elif resumed:  # its epochs after the resume shuffled from a fresh seed, not where it stopped
        notes.append(f"{expected}: the original was interrupted and resumed")
    if data_changed:
        notes.append(f"the data differs: {', '.join(data_changed)} digest changed")
    return f"{verdict} ({'; '.join(notes)})" if notes else verdict


def _selected_val_accuracy(
    cfg: DictConfig, result: trainer.FitResult, history: Mapping[str, Sequence[float]]
) -> float | None:
    """The validation accuracy of the epoch whose weights are tested and logged: the restored
    best epoch's under ``trainer.restore_best``, else the last epoch's (``history``: the run's
    per-epoch metrics); None without validation data. The per-epoch ``val_accuracy``, whose
    last value MLflow shows as the run's, is the last epoch's whatever was restored."""
    if cfg.trainer.restore_best and result.best_val_accuracy is not None:
        return float(result.best_val_accuracy)
    values = history.get("val_accuracy") or []
    return float(values[-1]) if values else None
