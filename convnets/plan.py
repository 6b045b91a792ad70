"""What a training job will run, decided before TensorFlow loads: one frozen :class:`Plan`.

:func:`make_plan` takes the composed config, the :class:`JobContext` its caller gives (the
overrides, the output folder, the sweep and search trial) and the store to read from, and
settles everything a user can get wrong, in order: ``reproduce=`` / ``resume=`` (the recorded
run and its config, the runtime overrides allowed over it, whether the checkpoint can
continue it), the stack and the data, the store (``init_from``'s run, the experiment). A
mistake costs seconds and leaves nothing half-written; the plan then names the config that
trains, where it is recorded and under which name and tags. Running it is
:mod:`convnets.job`; recording it, :mod:`convnets.recording`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from convnets import architecture, checkpoints, checks, sweep
from convnets.config import RUNTIME_KEYS, TrainConfig, flatten, is_runtime_key, override_key
from convnets.errors import ConfigError, TrackingError, command, warn
from convnets.sweep_files import is_parent, is_search_parent
from convnets.tracking import (
    CONFIG_ARTIFACT,
    git_changes,
    git_state,
    logged_model_uri,
    package_versions,
    redact,
    run_is_finished,
)

if TYPE_CHECKING:
    from convnets.recording import Recorder
    from convnets.tracking import Run as MlflowRun
    from convnets.trials import TrialLink

PACKAGE_DIR = Path(__file__).resolve().parent
RUN_NAME_LIMIT = sweep.RUN_NAME_LIMIT  # 60: MLflow's UI shows about that much of a name
CODE_DIFF_ARTIFACT = "code/git_diff.patch"  # a dirty tree's changes against its commit
# Overrides that say where or how a run is recorded, not what it is, and group choices the
# name already shows (model, dataset): never part of a run's name outside a sweep.
_NOT_IN_NAME = ("model", "dataset", *sweep.NOT_IN_NAME)


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
    # Called once TensorFlow, Keras and MLflow are loaded, before the data and the model: the
    # entry point's process-wide settings that need them (a library caller sets none).
    libraries_loaded: Callable[[], None] | None = None
    # Asked between training steps: a stop signal the entry point's handler received whose
    # exception may have been dropped (convnets.trainer.fit); a library caller passes none.
    stop_requested: Callable[[], int | None] | None = None


@dataclass(frozen=True)
class Source:
    """The recorded run that ``reproduce=`` or ``resume=`` points at."""

    key: str  # "reproduce" | "resume"
    run: MlflowRun

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


@dataclass(frozen=True)
class Plan:
    """One training, settled: the config that trains (the command's, or the recorded one of
    ``reproduce=`` / ``resume=`` with the runtime overrides applied), the stack's analysis, the
    input it reads, and where and how it is recorded."""

    cfg: DictConfig
    context: JobContext
    source: Source | None
    runtime_overrides: tuple[str, ...]
    stack: Any  # architecture.resolve_stack's layers
    input_shape: tuple[int, ...]
    num_classes: int
    analysis: architecture.Analysis
    experiment_id: str

    @property
    def resuming(self) -> bool:
        return self.source is not None and self.source.key == "resume"

    @property
    def reproducing(self) -> bool:
        return self.source is not None and self.source.key == "reproduce"

    @property
    def resume_folder(self) -> Path | None:
        """Where ``resume=`` reads the run's checkpoint: ``checkpoint_dir=`` (a copy), else
        the run's own ``checkpoint_dir`` tag."""
        return resume_folder(self.source.run, self.cfg) if self.resuming else None

    def output_dir(self) -> Path:
        import tempfile

        if self.context.output_dir is not None:
            return Path(self.context.output_dir).resolve()
        return Path(tempfile.mkdtemp(prefix="convnets-"))

    def run_name(self) -> str:
        if self.resuming:
            return self.source.run.info.run_name
        if self.source is not None:
            return f"{self.source.run.info.run_name}-reproduce"
        if self.cfg.tracking.run_name:
            return redact(str(self.cfg.tracking.run_name))[:RUN_NAME_LIMIT]
        return run_name(
            self.cfg.model.name, self.cfg.dataset.name, self.context.overrides, self.context.sweep
        )

    def tags(self) -> dict[str, str]:
        """The tags a run starts with: what it is (model, data, code, versions, config
        digest), what it reproduces, its sweep. A resume adds only that it resumed."""
        runtime = {"runtime_overrides": " ".join(self.runtime_overrides)}
        if self.resuming:
            return {"resumed": "true", **(runtime if self.runtime_overrides else {})}
        commit, dirty = git_state(PACKAGE_DIR)
        tags = {
            "dataset": self.cfg.dataset.name,
            "model": self.cfg.model.name,
            "git_commit": commit,
            "git_dirty": str(dirty).lower() if dirty is not None else "unknown",
            "hydra_overrides": " ".join(self.context.overrides),
            "config_digest": config_digest(self.cfg),
            **{f"version.{name}": v for name, v in package_versions().items()},
        }
        if self.source is not None:
            tags["reproduces"] = self.source.run_id
            tags.update(runtime)
        if self.context.sweep is not None:
            tags.update(self.context.sweep.tags())
        return tags


def make_plan(cfg: DictConfig, context: JobContext, recorder: Recorder) -> Plan:
    """Settle what runs, in the order that refuses a mistake soonest (no TensorFlow here)."""
    source, cfg, runtime = _resolve_source(cfg, context, recorder)  # 1. reproduce=/resume=
    stack, input_shape, num_classes, analysis = _check_architecture_and_data(cfg)  # 2.
    if cfg.get("init_from"):  # 3. the store: a typo in a run id fails here
        _check_init_source(recorder.get_run(str(cfg.init_from), key="init_from"))
    if source is not None and source.key == "resume":
        experiment_id = source.run.info.experiment_id
    elif source is not None and context.sweep is None and not cfg.tracking.experiment:
        # A reproduction goes beside its original unless told otherwise (it went to the
        # dataset's experiment, away from an original recorded with tracking.experiment=...).
        experiment_id = source.run.info.experiment_id
    elif context.sweep is not None:
        experiment_id = context.sweep.experiment_id  # created once by the sweep before the fan-out
    else:
        experiment_id = recorder.experiment_id(sweep.experiment_name(cfg))
    return Plan(
        cfg=cfg,
        context=context,
        source=source,
        runtime_overrides=tuple(runtime),
        stack=stack,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        analysis=analysis,
        experiment_id=experiment_id,
    )


def _resolve_source(
    cfg: DictConfig, context: JobContext, recorder: Recorder
) -> tuple[Source | None, DictConfig, list[str]]:
    """The config to train: the command line's, or the recorded one of reproduce=/resume=."""
    keys = [key for key in ("reproduce", "resume") if cfg.get(key)]
    if cfg.get("checkpoint_dir") and keys != ["resume"]:
        raise ConfigError(
            f"checkpoint_dir={cfg.checkpoint_dir} says where resume=<run id> finds a copy of "
            "that run's checkpoint folder; a new or reproduced run keeps its checkpoints in "
            "<its run dir>/checkpoints/<run id>: leave checkpoint_dir out"
        )
    if not keys:
        return None, cfg, []
    if len(keys) == 2:
        raise ConfigError("reproduce= and resume= exclude each other; give one of them")
    key = keys[0]
    run_id = str(cfg[key])
    others, runtime = [], []
    for override in context.overrides:
        name = override_key(override)
        if name not in ("reproduce", "resume"):
            (runtime if is_runtime_key(name) else others).append(override)
    if others:
        shown = ", ".join(
            f"{k}.*" if isinstance(OmegaConf.select(cfg, k), DictConfig) else k
            for k in RUNTIME_KEYS
        )
        raise ConfigError(
            f"{key}={run_id} reruns the recorded config exactly; drop the other overrides "
            f"({' '.join(others)}) -- only the runtime keys (where and how it runs) may "
            f"be given: {shown}"
        )
    run = recorder.get_run(run_id, key=key)
    if is_parent(run.data.tags):
        raise ConfigError(
            f"{key}={run_id} is the parent run of a sweep or search, not a training run; "
            f"reproduce every job of its study with {command('train')} -m reproduce={run_id}"
        )
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if key == "resume" and parent_id and is_search_parent(recorder.get_run(parent_id).data.tags):
        raise ConfigError(
            f"resume={run_id} is a trial of the search whose parent run is {parent_id}: its "
            "search continues it, asking a stopped trial's parameters again; rerun the "
            "search's command (the same -m ... hparams_search=... line)"
        )
    if key == "resume" and run_is_finished(run):
        raise ConfigError(
            f"resume={run_id}: the run already FINISHED; nothing to resume "
            f"({command('train')} reproduce={run_id} trains it again as a new run)"
        )
    if key == "resume" and "checkpoint_dir" not in run.data.tags:
        raise ConfigError(
            f"resume={run_id}: the run has no checkpoint_dir tag (it ended before its first "
            f"epoch, or is no training run); {command('train')} reproduce={run_id} trains it "
            "again as a new run"
        )
    fixed = [o for o in runtime if override_key(o) in _KEPT_BY_A_RESUMED_RUN]
    if key == "resume" and fixed:
        raise ConfigError(
            f"{' '.join(fixed)}: a resumed run keeps its experiment and its name; drop "
            f"{'it' if len(fixed) == 1 else 'them'} (reproduce={run_id} trains it again as a "
            "new run, which may go elsewhere)"
        )
    recorded = recorder.load_config(run_id, key=key)
    _warn_if_the_code_differs(key, run)
    rerun = _rerun_config(recorded, cfg, [override_key(o) for o in runtime])
    if key == "resume":
        _check_resumable(run, rerun)
    return Source(key, run), rerun, runtime


def _check_init_source(run: MlflowRun) -> None:
    """Refuse, before TensorFlow loads, an ``init_from=`` run that has no weights to give."""
    run_id = run.info.run_id
    if is_parent(run.data.tags):
        raise ConfigError(
            f"init_from={run_id} is the parent run of a sweep or search, which trains no "
            f"model; start from one of its jobs ({command('evaluate')} compare={run_id} "
            "lists them with their run ids)"
        )
    logged_model_uri(run, "init_from")


_KEPT_BY_A_RESUMED_RUN = ("tracking.experiment", "tracking.run_name")


def _warn_if_the_code_differs(key: str, run: MlflowRun) -> None:
    run_id = run.info.run_id
    commit, _ = git_state(PACKAGE_DIR)
    recorded_commit = run.data.tags.get("git_commit", "unknown")
    if commit != recorded_commit:
        warn(f"{key}={run_id} was recorded at git commit {recorded_commit}; this is {commit}")
    diff, _ = git_changes(PACKAGE_DIR.parent)
    recorded_diff = run.data.tags.get("git_diff_sha256")
    if (sha256(diff) if diff else None) != recorded_diff:
        how = (
            f"its changes are the artifact {CODE_DIFF_ARTIFACT}: mlflow artifacts download "
            f"--run-id {run_id} --artifact-path {CODE_DIFF_ARTIFACT} --dst-path . && git "
            f"checkout {recorded_commit} && git apply {CODE_DIFF_ARTIFACT}"
            if recorded_diff
            else f"it ran on a clean checkout of {recorded_commit}"
        )
        warn(f"{key}={run_id}: this working tree's changes differ from the run's; {how}")


def _check_architecture_and_data(cfg: DictConfig):
    from convnets import data

    checks.check_config(cfg)
    stack = architecture.resolve_stack(cfg.model)
    train_images = data.check_available(cfg.dataset)
    input_shape, num_classes = data.dataset_shape(cfg.dataset)
    analysis = architecture.analyze(stack, input_shape, num_classes)
    for warning in analysis.warnings:
        warn(warning)
    pad, side = int(cfg.dataset.augment.random_crop_padding), min(input_shape[:2])
    if pad * 2 > side:  # the average crop then keeps less than ~56% of the image
        warn(
            f"dataset.augment.random_crop_padding={pad} on {input_shape[0]}x{input_shape[1]} "
            f"images: a random crop is then largely padding; CIFAR's usual is 4 on 32x32, "
            f"about {max(1, side // 8)} here"
        )
    memory = checks.check_memory(analysis, cfg.trainer.batch_size, train_images=train_images)
    if memory is not None:
        warn(memory)
    if cfg.trainer.restore_best and cfg.dataset.val_fraction == 0:
        warn(
            "trainer.restore_best=true with dataset.val_fraction=0: there is no validation "
            "split to choose an epoch by, so the last epoch's weights are tested; set "
            "trainer.restore_best=false (or a val_fraction > 0)"
        )
    return stack, input_shape, num_classes, analysis


def _rerun_config(recorded: DictConfig, current: DictConfig, runtime: Sequence[str]) -> DictConfig:
    """The recorded config, checked against today's schema, recorded in today's store (the
    command line's ``tracking.uri`` and ``tracking.experiment``; the other ``tracking`` keys,
    such as ``log_model``, as recorded), with the runtime keys given on this command line
    (``runtime``) taken from it."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), recorded)
    except Exception as err:  # noqa: BLE001 - OmegaConf's validation errors
        raise ConfigError(
            f"the recorded {CONFIG_ARTIFACT} no longer fits the config schema ({err}); "
            "check out the run's git_commit and rerun from there"
        ) from err
    recorded_tracking = OmegaConf.to_container(cfg.tracking)  # a copy: the node is replaced
    cfg.tracking = current.tracking
    for name, value in recorded_tracking.items():  # how the run recorded itself stays
        if name not in _WHERE_IT_RECORDS and f"tracking.{name}" not in runtime:
            cfg.tracking[name] = value
    for key in runtime:
        OmegaConf.update(cfg, key, OmegaConf.select(current, key), merge=False)
    return cfg


# The tracking keys a rerun takes from today's command line, given or not: the store it was
# looked up in, and the experiment (a reproduction's goes beside its original unless given).
_WHERE_IT_RECORDS = ("uri", "experiment")


def _check_resumable(run: MlflowRun, cfg: DictConfig) -> None:
    """Refuse to resume a run from a checkpoint that cannot continue it, in one line."""
    run_id = run.info.run_id
    if not cfg.trainer.checkpoint_every_epoch:
        raise TrackingError(
            f"resume={run_id}: the run was trained with trainer.checkpoint_every_epoch=false, "
            f"so no epoch can be continued; {command('train')} reproduce={run_id} trains it "
            "again as a new run"
        )
    checkpoint_dir = resume_folder(run, cfg)
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
        # Killed before its first epoch ended, it starts from epoch 1 with nothing to splice.
        # Epochs it recorded, or weights left in the folder, say the commit record was lost.
        leftovers = sorted(p.name for p in checkpoint_dir.glob("*.weights.h5"))
        if leftovers or "loss" in run.data.metrics:
            evidence = (
                f"it holds {', '.join(leftovers)}" if leftovers else "the run recorded epochs"
            )
            raise TrackingError(
                f"resume={run_id}: {checkpoint_dir} has no {checkpoints.STATE_FILE} but "
                f"{evidence}: which epoch to continue from is unknown; refusing to train the "
                f"run again from epoch 1 as the same run ({command('train')} reproduce={run_id} "
                "trains it again as a new run)"
            )
        return
    if state["epoch"] > cfg.trainer.epochs:
        raise TrackingError(
            f"resume={run_id}: {checkpoint_dir / checkpoints.STATE_FILE} says epoch "
            f"{state['epoch']} of a run of trainer.epochs={cfg.trainer.epochs}; the record was "
            "changed after it was written; refusing to continue from it"
        )
    checkpoints.verify(checkpoint_dir, state)  # before TensorFlow loads anything
    owner = state.get("run_id")
    if owner != run_id or state.get("config_digest") != config_digest(cfg):
        whose = f"run {owner}" if owner and owner != run_id else "another training"
        raise TrackingError(
            f"resume={run_id}: the checkpoint in {checkpoint_dir} belongs to {whose}, not to "
            f"this run (its {checkpoints.STATE_FILE} says so); refusing to continue from it "
            f"({command('train')} reproduce={run_id} trains the run again as a new run)"
        )


def resume_folder(run: MlflowRun, cfg: DictConfig) -> Path:
    """Where resume= reads the run's checkpoint: ``checkpoint_dir=`` (a copy), else its tag."""
    return Path(cfg.get("checkpoint_dir") or run.data.tags["checkpoint_dir"]).expanduser()


# ---------------------------------------------------------------- names and digests


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
        key = override_key(override)
        if key in _NOT_IN_NAME or key.startswith("tracking."):
            continue
        short = key.split(".", 1)[-1].removeprefix("layer_defaults.")
        parts.append(f"{short}={override.split('=', 1)[1]}" if "=" in override else short)
    words = [f"{model}-{dataset}", *parts]
    if parts:  # simple_cnn-digits-kernel_size=5,width=2
        words[:2] = [f"{words[0]}-{words[1]}"]
    return sweep.fit_name([redact(word) for word in words], ",", RUN_NAME_LIMIT)


def config_digest(cfg: DictConfig) -> str:
    """sha256 of what is trained: the recorded config without the runtime keys
    (:data:`convnets.config.RUNTIME_KEYS`), so it holds on another machine."""
    trained = {
        key: value for key, value in flatten(recordable(cfg)).items() if not is_runtime_key(key)
    }
    return hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()


def recordable(cfg: DictConfig) -> dict[str, Any]:
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


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
