"""The fit loop: optimiser and schedule, precision, checkpoints and resume, failure handling.

Knows nothing of Hydra or MLflow: it takes the config nodes (``TrainerConfig``,
``OptimizerConfig``) as plain objects, a strategy from :mod:`convnets.distribute`, and a
function to call after each epoch (the job's record), and hands back the model and a
:class:`FitResult`.

Checkpoints (their layout: :mod:`convnets.checkpoints`) are written only at epoch ends.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # no public way to turn it off

from convnets import checkpoints
from convnets.errors import ConfigError, Interrupted, TrainingFailed

log = logging.getLogger(__name__)

# one_cycle: fraction of training spent rising when optimizer.warmup_epochs is 0, and the
# starting lr as lr / ONE_CYCLE_DIV (PyTorch OneCycleLR's pct_start=0.3, div_factor=25).
ONE_CYCLE_PCT_START = 0.3
ONE_CYCLE_DIV = 25.0


# ---------------------------------------------------------------- process-wide settings


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; ``deterministic`` turns op determinism on,
    and off again for a run that does not ask for it.

    Op determinism is process-wide: left on after a deterministic run, it would make every
    later run in the process (a notebook's, ``convnets.train`` called again) deterministic
    too, slower, and without XLA (Keras turns ``jit_compile`` off under it). TensorFlow has a
    public switch to turn it on only; ``disable_op_determinism`` is its private counterpart
    (``tensorflow.python.framework.config``), pinned by a canary in tests/test_trainer.py.
    """
    keras.utils.set_random_seed(int(seed))
    set_op_determinism(deterministic)


def op_determinism() -> bool:
    """Whether TensorFlow's process-wide op determinism is on (see :func:`seed_everything`)."""
    return tf_config.is_op_determinism_enabled()


def set_op_determinism(on: bool) -> None:
    """TensorFlow's process-wide op determinism on or off (see :func:`seed_everything`)."""
    if on:
        tf.config.experimental.enable_op_determinism()
    elif op_determinism():
        tf_config.disable_op_determinism()


def set_precision(precision: str) -> None:
    """Set Keras's global dtype policy; the model builder keeps its output in float32."""
    keras.mixed_precision.set_global_policy(str(precision))


# ---------------------------------------------------------------- optimiser


def build_optimizer(
    opt_cfg, *, steps_per_epoch: int, epochs: int, num_replicas: int
) -> keras.optimizers.Optimizer:
    """The optimiser and learning-rate schedule named by the ``optimizer`` config.

    Schedules are Keras's ``CosineDecay`` (serialisable, so a saved model loads without
    custom objects), evaluated per optimizer step:

    - ``constant``: ``lr``, after an optional linear warm-up from 0 over ``warmup_epochs``;
    - ``cosine``: linear warm-up from 0 to ``lr``, then cosine decay to ``lr * min_lr_fraction``
      at the last step;
    - ``one_cycle``: linear rise from ``lr / 25`` to the peak ``lr`` over ``warmup_epochs`` (30%
      of training when 0), then cosine annealing to ``lr * min_lr_fraction`` (the 1cycle
      policy's learning-rate curve as in PyTorch's OneCycleLR; momentum is not cycled).

    ``scale_lr_with_replicas`` applies the linear scaling rule (Goyal et al. 2017): ``lr`` times
    the number of replicas, for a global batch that grows with them.

    Takes a validated config (:func:`convnets.checks.check_config`: names, ``lr > 0``,
    ``warmup_epochs`` shorter than training).
    """
    lr = float(opt_cfg.lr) * (num_replicas if opt_cfg.scale_lr_with_replicas else 1)
    schedule = _schedule(opt_cfg, lr, steps_per_epoch=steps_per_epoch, epochs=epochs)
    common = {
        "learning_rate": schedule,
        "weight_decay": float(opt_cfg.weight_decay) or None,
        "clipnorm": opt_cfg.clipnorm,
    }
    if opt_cfg.name == "sgd":
        return keras.optimizers.SGD(
            momentum=float(opt_cfg.momentum), nesterov=bool(opt_cfg.nesterov), **common
        )
    # Keras 3 applies weight_decay decoupled (AdamW-style) in every optimiser; AdamW only
    # differs in its default decay, so both names map to their Keras class.
    cls = keras.optimizers.AdamW if opt_cfg.name == "adamw" else keras.optimizers.Adam
    if cls is keras.optimizers.AdamW:
        common["weight_decay"] = float(opt_cfg.weight_decay)
    return cls(beta_1=float(opt_cfg.beta_1), beta_2=float(opt_cfg.beta_2), **common)


def _schedule(opt_cfg, lr: float, *, steps_per_epoch: int, epochs: int):
    total = max(1, int(steps_per_epoch) * int(epochs))
    warmup = min(round(float(opt_cfg.warmup_epochs) * steps_per_epoch), total - 1)
    floor = float(opt_cfg.min_lr_fraction)
    if opt_cfg.schedule == "constant":
        if warmup == 0:
            return lr
        # alpha=1 makes CosineDecay's decay phase flat: a constant lr after the warm-up.
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total - warmup, alpha=1.0, warmup_target=lr, warmup_steps=warmup
        )
    start = 0.0
    if opt_cfg.schedule == "one_cycle":
        warmup = warmup or max(1, round(ONE_CYCLE_PCT_START * total))
        start = lr / ONE_CYCLE_DIV
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=total, alpha=floor)
    return keras.optimizers.schedules.CosineDecay(
        start, decay_steps=total - warmup, alpha=floor, warmup_target=lr, warmup_steps=warmup
    )


# ---------------------------------------------------------------- fit


# How trainer.restore_best picks the epoch whose weights are tested and logged.
BEST_EPOCH_CRITERION = "min val_loss (ties: max val_accuracy)"


@dataclass
class FitResult:
    """What one :func:`fit` call did.

    ``history``: per epoch completed in *this* call: loss, accuracy, val_loss, val_accuracy
    (when there is validation data), lr. ``initial_epoch``: epochs already done before this
    call (from a resumed checkpoint); ``epochs_completed``: the total, counting those.
    ``images_per_sec``: training images / training seconds over this call's epochs, leaving
    out validation, checkpointing and (when there are two or more) the first epoch, which pays
    for tracing and XLA compilation (a resume with no epoch left: the rate its checkpoint
    recorded). ``train_time_s``: wall time of ``model.fit``, a resumed run's earlier calls
    included as its checkpoint recorded them (up to the last committed epoch).
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    initial_epoch: int = 0
    epochs_completed: int = 0
    best_epoch: int | None = None
    best_val_accuracy: float | None = None
    train_time_s: float = 0.0
    images_per_sec: float = 0.0
    startup_s: float | None = None  # process start -> first train step (first fit only)


def fit(
    build_model: Callable[[], keras.Model],
    data,
    trainer_cfg,
    opt_cfg,
    strategy: tf.distribute.Strategy,
    *,
    checkpoint_dir: str | Path,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    after_epoch: Callable[[int, Mapping[str, float]], bool] | None = None,
    resume: bool = False,
    identity: Mapping[str, str] | None = None,
    stop_requested: Callable[[], int | None] | None = None,
) -> tuple[keras.Model, FitResult]:
    """Build, compile and train the model under ``strategy``; checkpoint every epoch.

    Re-seeds from ``trainer_cfg.seed`` before building the model, so the same config gives
    the same initial weights. ``resume=True`` restores the last committed epoch from
    ``checkpoint_dir`` (weights, optimizer state, best so far) and trains the remaining
    epochs; without a checkpoint it starts from epoch 1 (checking that the checkpoint is the
    caller's is the caller's job: see ``identity`` in :mod:`convnets.checkpoints`). ``resume=False``
    refuses a ``checkpoint_dir`` that already holds a checkpoint. ``after_epoch(epoch, logs)``
    runs at each epoch end once the epoch is committed (a non-finite one, never committed,
    too; epochs numbered from 1; ``logs`` with ``lr``); it returning True stops training. Raises
    :class:`TrainingFailed` when the loss becomes NaN/inf (the last good epoch's checkpoint
    stays); ``KeyboardInterrupt`` propagates, with the last completed epoch checkpointed.
    ``stop_requested()``, asked after every step, returns a stop signal's number (None: go
    on): the entry point's record of a Ctrl-C or SIGTERM whose exception Python may have
    dropped; training then raises it as it would have.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = checkpoints.read_state(checkpoint_dir)
    if not resume and state is not None:
        raise ConfigError(
            f"{checkpoint_dir} already holds a checkpoint ({checkpoints.STATE_FILE}); a new training "
            "needs its own checkpoint directory"
        )
    if resume and state is None:
        log.info("no checkpoint in %s: training from epoch 1", checkpoint_dir)
    if state is not None:
        checkpoints.verify(checkpoint_dir, state)

    seed_everything(trainer_cfg.seed, trainer_cfg.deterministic)
    one_hot = trainer_cfg.label_smoothing > 0
    train = _prepare(data.train, data.num_classes, one_hot, strategy)
    val = _prepare(data.val, data.num_classes, one_hot, strategy) if data.val is not None else None
    steps_per_epoch = _steps_per_epoch(train, data.num_train, trainer_cfg.batch_size)

    with strategy.scope():
        model = build_model()
        optimizer = build_optimizer(
            opt_cfg,
            steps_per_epoch=steps_per_epoch,
            epochs=trainer_cfg.epochs,
            num_replicas=strategy.num_replicas_in_sync,
        )
        model.compile(
            optimizer=optimizer,
            loss=_loss(trainer_cfg.label_smoothing),
            metrics=["accuracy"],
            jit_compile=bool(trainer_cfg.jit_compile),
            steps_per_execution=int(trainer_cfg.steps_per_execution),
        )
        # Built before fit: load_weights skips optimizer slots that do not exist yet, and
        # slots made in the train step's first trace make it traced twice (_build_metrics).
        model.optimizer.build(model.trainable_variables)
        if not tf.distribute.has_strategy():
            _build_metrics(model, train.element_spec)
        if state is not None and state.get("last"):
            model.load_weights(checkpoint_dir / state["last"])

    initial_epoch = state["epoch"] if state and state.get("last") else 0
    replicas = strategy.num_replicas_in_sync
    timer = _Throughput(data.num_train - data.train_dropped_per_epoch)
    epoch_state = _EpochState(
        checkpoint_dir,
        state if initial_epoch else None,
        save_last=trainer_cfg.checkpoint_every_epoch,
        writer=bool(strategy.extended.should_checkpoint),
        identity=identity,
        throughput=timer,
        after_epoch=after_epoch,
    )
    started = time.perf_counter()
    try:
        try:
            history = model.fit(
                train,
                validation_data=val,
                epochs=trainer_cfg.epochs,
                initial_epoch=initial_epoch,
                callbacks=[
                    timer,
                    *([_AverageReplicaStatistics(strategy)] if replicas > 1 else []),
                    epoch_state,
                    *([_StopWhenRequested(stop_requested)] if stop_requested else []),
                    *callbacks,
                ],
                verbose=trainer_cfg.verbose,
                shuffle=False,  # the pipeline shuffles (seeded); Keras cannot shuffle a Dataset
            )
        except (tf.errors.ResourceExhaustedError, tf.errors.AbortedError) as err:
            if not _out_of_memory(err):
                raise
            done = (
                f" after epoch {epoch_state.epoch} (its checkpoint is kept)"
                if (epoch_state.epoch)
                else ""
            )
            lines = str(err.message).splitlines()
            what = next((line for line in lines if _out_of_memory_line(line)), "")
            raise TrainingFailed(
                f"out of memory{done}: {what.strip()[:200]}; lower "
                f"trainer.batch_size (now {trainer_cfg.batch_size}), model.width or the filters"
            ) from None
        train_time = time.perf_counter() - started
        if epoch_state.failure is not None:
            epoch, loss = epoch_state.failure
            hint = (
                "" if trainer_cfg.precision == "float32" else ", or use trainer.precision=float32"
            )
            raise TrainingFailed(
                f"training loss became {loss} at epoch {epoch}; lower optimizer.lr (now "
                f"{opt_cfg.lr}) or set optimizer.clipnorm (now {opt_cfg.clipnorm}){hint}"
            )
        if trainer_cfg.restore_best and val is not None and epoch_state.best_path is not None:
            model.load_weights(epoch_state.best_path)
    finally:
        epoch_state.cleanup_if_temporary()

    return model, FitResult(
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        initial_epoch=initial_epoch,
        epochs_completed=epoch_state.epoch,
        best_epoch=epoch_state.best_epoch,
        best_val_accuracy=epoch_state.best_val_accuracy,
        train_time_s=epoch_state.trained_s_before + train_time,
        images_per_sec=epoch_state.images_per_sec(),
        startup_s=timer.startup_s,
    )


def evaluate(model: keras.Model, dataset) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of a compiled model on a batched ``(image, label)`` split."""
    one_hot = isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    num_classes = model.output_shape[-1]
    logs = model.evaluate(
        _prepare(dataset, num_classes, one_hot, None), verbose=0, return_dict=True
    )
    return {"loss": float(logs["loss"]), "accuracy": float(logs["accuracy"])}


def save_final_model(model: keras.Model, checkpoint_dir: str | Path, config_yaml: str) -> Path:
    """Write ``model.keras`` (with its compiled loss and metrics, so it evaluates as is) and
    ``config.yaml`` into ``checkpoint_dir``; return the model's path. Each file is replaced
    atomically, so a killed process never leaves a half-written one."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / checkpoints.FINAL_MODEL
    with checkpoints.replacing(path, f".tmp-{checkpoints.FINAL_MODEL}") as tmp:
        model.save(tmp)
    checkpoints.atomic_write_text(checkpoint_dir / checkpoints.FINAL_CONFIG, config_yaml)
    return path


# ---------------------------------------------------------------- helpers


def _loss(label_smoothing: float) -> keras.losses.Loss:
    if label_smoothing > 0:
        # Keras's sparse cross-entropy has no label_smoothing: labels go one-hot instead.
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def _prepare(dataset, num_classes: int, one_hot: bool, strategy):
    if one_hot:
        dataset = dataset.map(
            lambda x, y: (x, tf.one_hot(tf.cast(y, tf.int32), num_classes)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # In-memory data has no files to shard by: each worker takes its part of each batch.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        dataset = dataset.with_options(options)
    return dataset


def _build_metrics(model: keras.Model, element_spec) -> None:
    """Create the compiled metrics' variables before ``fit``, on one batch of zeros.

    Under a distribution strategy Keras builds the optimizer and the metrics before tracing
    the train step; on one device it leaves them to that first trace, and variables created
    inside a ``tf.function``'s first trace make TensorFlow trace it a second time (its cost is
    in benchmarks/README.md). With the optimizer built by the caller and the metrics here, the
    train step is traced once.
    """
    x_spec, y_spec = element_spec
    x = tf.zeros([1, *x_spec.shape[1:]], x_spec.dtype)
    y = tf.zeros([1, *y_spec.shape[1:]], y_spec.dtype)
    model.compute_metrics(x, y, model(x, training=False), sample_weight=None)
    model.reset_metrics()


def _steps_per_epoch(dataset, num_examples: int, batch_size: int) -> int:
    steps = int(dataset.cardinality())
    return steps if steps > 0 else max(1, math.ceil(num_examples / batch_size))


_FIRST_STEP_SEEN = False  # startup_s: only the process's first fit measures it


# TensorFlow's allocator reports "OOM when allocating tensor ..." (ResourceExhaustedError); a
# oneDNN kernel whose buffer cannot be allocated aborts the op with dnnl_out_of_memory, status 1
# ("Status: 1, message: could not create a memory object", AbortedError).
def _out_of_memory_line(line: str) -> bool:
    return "OOM when allocating" in line or "Status: 1, message: could not create" in line


def _out_of_memory(err: tf.errors.OpError) -> bool:
    return isinstance(err, tf.errors.ResourceExhaustedError) or any(
        _out_of_memory_line(line) for line in str(err.message).splitlines()
    )


def _process_age() -> float | None:
    """Seconds since this process started (psutil, an MLflow dependency), else None."""
    try:
        import psutil
    except ImportError:
        return None
    return time.time() - psutil.Process().create_time()


class _AverageReplicaStatistics(keras.callbacks.Callback):
    """Gives every replica the replicas' mean of batch norm's moving statistics before each
    evaluation and at each epoch's end (before its checkpoint).

    Each replica updates its copy from its own share of the batch, so the copies drift apart
    (unless ``distribute.sync_batch_norm``). Keras evaluates each replica with its own copy,
    while a checkpoint or a logged model holds the first replica's: the validation accuracy
    that picks the best epoch, and a test accuracy measured without restoring weights, were
    figures of no model that was saved. With the mean in every replica, the evaluated, the
    checkpointed and the logged model are one model, and its statistics come from every
    replica's images (as one device's would).
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy
        self._average = None

    def set_model(self, model):
        super().set_model(model)
        statistics = [
            v
            for layer in model.layers  # the package's models are flat
            if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized
            for v in (layer.moving_mean, layer.moving_variance)
        ]

        @tf.function
        def average():
            context = tf.distribute.get_replica_context()
            for variable in statistics:
                # this replica's copy as a tensor: MultiWorkerMirroredStrategy's all-reduce
                # refuses the distributed variable itself ("destinations can not be empty")
                local = tf.identity(variable.value)
                variable.assign(context.all_reduce("mean", local))

        self._average = (lambda: self.strategy.run(average)) if statistics else None

    def on_test_begin(self, logs=None):
        if self._average is not None:
            self._average()

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()


class _StopWhenRequested(keras.callbacks.Callback):
    """Raises, after a step, the stop signal that ``stop_requested()`` reports."""

    def __init__(self, stop_requested: Callable[[], int | None]):
        super().__init__()
        self.stop_requested = stop_requested

    def on_train_batch_end(self, batch, logs=None):
        raise_stop(self.stop_requested())


def raise_stop(signum: int | None) -> None:
    """Raise the stop signal ``signum`` (from ``stop_requested()``) as its handler would
    have: ``KeyboardInterrupt`` for Ctrl-C, :class:`Interrupted` for the others."""
    if signum is not None:
        raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


class _Throughput(keras.callbacks.Callback):
    """Training seconds per epoch from epoch-level hooks only (nothing per batch), with the
    validation pass that Keras runs inside the epoch subtracted. Also ``startup_s``: process
    start to the first train step, from a batch-begin hook that does nothing after it."""

    def __init__(self, num_train: int):
        super().__init__()
        self.num_train = num_train
        self.epoch_seconds: list[float] = []
        self.startup_s: float | None = None

    def on_train_batch_begin(self, batch, logs=None):
        # Begin hooks keep Keras's async dispatch (only batch-end hooks force a sync).
        global _FIRST_STEP_SEEN
        if not _FIRST_STEP_SEEN:
            _FIRST_STEP_SEEN = True
            self.startup_s = _process_age()

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._val = time.perf_counter(), 0.0

    def on_test_begin(self, logs=None):
        self._val_start = time.perf_counter()

    def on_test_end(self, logs=None):
        self._val += time.perf_counter() - self._val_start

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start - self._val)

    def images_per_sec(self) -> float:
        steady = self.epoch_seconds[1:] or self.epoch_seconds
        return self.num_train * len(steady) / sum(steady) if steady else 0.0


class _EpochState(keras.callbacks.Callback):
    """At each epoch end, before the user's callbacks: add ``lr`` to the logs, stop on a
    non-finite loss, keep the best weights, commit the epoch's checkpoint, then call
    ``after_epoch`` (so an epoch the caller records is one a resume will not repeat; a
    non-finite epoch is passed on too, uncommitted, so the record shows where it diverged).

    Hand-written rather than Keras's ModelCheckpoint/BackupAndRestore: those overwrite files
    in place (a kill mid-write corrupts them) and keep the epoch number in a separate file.
    Only epoch-level hooks, so Keras keeps dispatching batches asynchronously.

    Under MultiWorkerMirroredStrategy every worker saves (reading variables may need all of
    them), but only the chief writes into ``checkpoint_dir``; the others use a temporary one.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        state: dict | None,
        *,
        save_last: bool,
        writer: bool,
        identity: Mapping[str, str] | None,
        throughput: _Throughput,
        after_epoch: Callable[[int, Mapping[str, float]], bool] | None = None,
    ):
        super().__init__()
        self.throughput = throughput
        self.after_epoch = after_epoch
        self.identity = dict(identity or {})
        self.write_dir = checkpoint_dir if writer else Path(tempfile.mkdtemp(prefix="ckpt-"))
        self.temporary = not writer
        self.write_dir.mkdir(parents=True, exist_ok=True)
        self.save_last = save_last
        state = state or {}
        self.epoch: int = state.get("epoch", 0)
        self.history: list[dict] = state.get("history", [])
        self.best_epoch: int | None = state.get("best_epoch")
        self.best_val_accuracy: float | None = state.get("best_val_accuracy")
        self.best_val_loss: float | None = state.get("best_val_loss")
        self.best_file: str | None = state.get("best")
        self.last_file: str | None = state.get("last")
        self.failure: tuple[int, float] | None = None
        # Training time and rate up to the committed epoch, over every call that trained it.
        self.trained_s_before: float = float(state.get("train_time_s", 0.0))
        self.images_per_sec_before: float = float(state.get("images_per_sec", 0.0))
        self.train_started = time.perf_counter()  # this call's: set again as fit begins

    def on_train_begin(self, logs=None):
        self.train_started = time.perf_counter()

    def images_per_sec(self) -> float:
        """This call's rate (:class:`_Throughput`); a resume with no epoch left to train keeps
        the one its checkpoint recorded."""
        if self.throughput.epoch_seconds:
            return self.throughput.images_per_sec()
        return self.images_per_sec_before

    @property
    def best_path(self) -> Path | None:
        return self.write_dir / self.best_file if self.best_file else None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        number = epoch + 1  # Keras counts from 0; people and the MLflow history from 1
        if not math.isfinite(logs.get("loss", 0.0)):
            self.failure = (number, logs["loss"])
            self.model.stop_training = True
            self._tell_caller(number, logs)
            return  # the last good epoch's checkpoint stays the committed one
        if self.save_last:
            self.last_file = self._save(f"epoch-{number:04d}.weights.h5")
        if self._is_best(logs):
            self.best_epoch, self.best_val_accuracy = number, float(logs["val_accuracy"])
            self.best_val_loss = float(logs["val_loss"])
            # The same weights as the epoch's file: a copy, not Keras serialising them again.
            self.best_file = self._save(
                f"best-{number:04d}.weights.h5", self.last_file if self.save_last else None
            )
        self.epoch = number
        self.history.append({"epoch": number, **{k: float(v) for k, v in logs.items()}})
        self._commit()
        self._tell_caller(number, logs)

    def _is_best(self, logs: Mapping[str, float]) -> bool:
        """:data:`BEST_EPOCH_CRITERION`: the lowest validation loss, higher validation accuracy
        breaking a tie. Accuracy alone moves in steps of one image: on a validation split of
        ~150 images, one image flipped made an epoch with three times the loss "best"."""
        loss, accuracy = logs.get("val_loss"), logs.get("val_accuracy")
        if loss is None or accuracy is None or not math.isfinite(loss):
            return False
        if self.best_val_loss is None:
            return True
        return loss < self.best_val_loss or (
            loss == self.best_val_loss and accuracy > (self.best_val_accuracy or -math.inf)
        )

    def _tell_caller(self, number: int, logs: Mapping[str, float]) -> None:
        if self.after_epoch is not None and self.after_epoch(number, logs):
            self.model.stop_training = True

    def _save(self, name: str, copy_of: str | None = None) -> str:
        with checkpoints.replacing(self.write_dir / name, f".tmp-{name}") as tmp:
            if copy_of is None:
                self.model.save_weights(tmp)
            else:
                shutil.copyfile(self.write_dir / copy_of, tmp)
        return name

    def _commit(self) -> None:
        state = {
            **self.identity,
            "epoch": self.epoch,
            "last": self.last_file,
            "best": self.best_file,
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "best_val_loss": self.best_val_loss,
            "history": self.history,
            "train_time_s": self.trained_s_before + time.perf_counter() - self.train_started,
            "images_per_sec": self.images_per_sec(),
            "sha256": {  # what verify() checks before any of them is loaded again
                name: checkpoints.sha256(self.write_dir / name)
                for name in (self.last_file, self.best_file)
                if name is not None
            },
        }
        checkpoints.atomic_write_text(
            self.write_dir / checkpoints.STATE_FILE, json.dumps(state, indent=1)
        )
        # Files the committed state no longer names are stale: drop them.
        keep = {self.last_file, self.best_file}
        for path in self.write_dir.glob("*.weights.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def cleanup_if_temporary(self) -> None:
        if self.temporary:
            shutil.rmtree(self.write_dir, ignore_errors=True)
