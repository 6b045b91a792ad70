"""convnets.trainer: real (tiny) training on digits on one CPU device.

The data and model come from tests/multiworker_worker.py so that these tests and the
distribution tests train the same thing: 1200 training images, global batch 64 (19 steps per
epoch), a 3k-parameter CNN.
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from multiworker_worker import digits_bundle, tiny_cnn
from omegaconf import OmegaConf
from tensorflow.python.framework import config as tf_config  # as convnets.trainer does

from convnets.checkpoints import read_state
from convnets.config import OptimizerConfig, TrainerConfig
from convnets.errors import Interrupted, TrainingFailed
from convnets.trainer import (
    build_optimizer,
    evaluate,
    fit,
    set_precision,
)

STEPS = 19  # ceil(1200 / 64)


def trainer_cfg(**kwargs):
    return OmegaConf.structured(TrainerConfig(**{"epochs": 2, "verbose": 0, **kwargs}))


def opt_cfg(**kwargs):
    return OmegaConf.structured(OptimizerConfig(**{"lr": 3e-3, **kwargs}))


def untyped_opt_cfg(**kwargs):
    """An optimizer config outside the schema (its Enums would refuse these values)."""
    return OmegaConf.create({**OmegaConf.to_container(opt_cfg(), enum_to_str=True), **kwargs})


@pytest.fixture
def strategy():
    return tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.fixture
def no_leftover_determinism():
    """Op determinism is process-wide and has no public off switch: restore it afterwards so
    other tests in the session run as they would alone."""
    before = tf_config.is_op_determinism_enabled()
    yield
    if not before:
        tf_config.disable_op_determinism()


def train(strategy, tmp_path, t=None, o=None, *, val=True, **fit_kwargs):
    t, o = t or trainer_cfg(), o or opt_cfg()
    data = digits_bundle(batch_size=t.batch_size, seed=t.seed, val=val)
    model, result = fit(
        tiny_cnn, data, t, o, strategy, checkpoint_dir=tmp_path / "ckpt", **fit_kwargs
    )
    return model, result, data


class Recorder(keras.callbacks.Callback):
    """Stands in for the tracker: what each epoch's logs held when a user callback saw them."""

    def __init__(self):
        super().__init__()
        self.epochs: list[tuple[int, dict]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((epoch + 1, dict(logs)))


class InterruptAfter(keras.callbacks.Callback):
    """Ctrl-C at the end of an epoch (after the trainer committed its checkpoint)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


class PoisonAfter(keras.callbacks.Callback):
    """Set the classifier's kernel to NaN after an epoch: the next epoch's loss is NaN."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            kernel = self.model.get_layer("probabilities").kernel
            kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))


def test_deterministic_runs_are_bit_identical_and_keep_the_best(
    strategy, tmp_path, no_leftover_determinism
):
    t = trainer_cfg(epochs=3, deterministic=True, seed=3)
    runs = [train(strategy, tmp_path / str(i), t) for i in range(2)]
    (m1, r1, data), (m2, r2, _) = runs
    assert r1.history == r2.history
    assert evaluate(m1, data.test) == evaluate(m2, data.test)
    assert r1.history["loss"][-1] < r1.history["loss"][0]  # it learns
    assert set(r1.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert (r1.initial_epoch, r1.epochs_completed) == (0, 3)
    assert r1.images_per_sec > 0 and r1.train_time_s > 0
    # restore_best: the returned model holds the best epoch's weights.
    best = int(np.argmin(r1.history["val_loss"])) + 1  # the documented criterion
    assert (r1.best_epoch, r1.best_val_accuracy) == (best, r1.history["val_accuracy"][best - 1])
    state = read_state(tmp_path / "0" / "ckpt")
    fresh = tiny_cnn()
    fresh.load_weights(tmp_path / "0" / "ckpt" / state["best"])
    for a, b in zip(fresh.get_weights(), m1.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_interrupt_then_resume_covers_every_epoch_once(strategy, tmp_path):
    t = trainer_cfg(epochs=4)
    first, second = Recorder(), Recorder()
    with pytest.raises(KeyboardInterrupt):
        train(strategy, tmp_path, t, callbacks=[first, InterruptAfter(2)])
    interrupted = read_state(tmp_path / "ckpt")
    assert interrupted["epoch"] == 2 and interrupted["train_time_s"] > 0
    # A kill during a later write leaves a partial temporary file behind: it must not matter.
    (tmp_path / "ckpt" / ".tmp-epoch-0003.weights.h5").write_bytes(b"partial")

    model, result, _ = train(strategy, tmp_path, t, callbacks=[second], resume=True)
    # The run's training time counts the interrupted call's committed epochs too.
    assert result.train_time_s > interrupted["train_time_s"]
    _, nothing_left, _ = train(strategy, tmp_path, t, resume=True)  # every epoch committed
    finished = read_state(tmp_path / "ckpt")
    assert nothing_left.epochs_completed == 4 and not nothing_left.history.get("loss")
    assert nothing_left.train_time_s >= finished["train_time_s"] > interrupted["train_time_s"]
    assert nothing_left.images_per_sec == finished["images_per_sec"] > 0

    assert [e for e, _ in first.epochs] == [1, 2]
    assert [e for e, _ in second.epochs] == [3, 4]
    assert (result.initial_epoch, result.epochs_completed) == (2, 4)
    assert len(result.history["loss"]) == 2
    assert int(model.optimizer.iterations) == 4 * STEPS  # optimizer state came back too
    state = read_state(tmp_path / "ckpt")
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
    # User callbacks (the tracker) see lr and the validation metrics in every epoch's logs.
    for _, logs in first.epochs + second.epochs:
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(logs)
    # Resuming picked up where the interrupted run was, not from scratch.
    assert second.epochs[0][1]["loss"] < first.epochs[0][1]["loss"]


@pytest.mark.parametrize(("signum", "raised"), [(2, KeyboardInterrupt), (15, Interrupted)])
def test_a_stop_whose_exception_was_dropped_still_stops_training(
    strategy, tmp_path, signum, raised
):
    """The entry point reports a stop signal Python swallowed (convnets.cli.stop_requested):
    training raises it after the step it came in, with the last committed epoch kept."""
    asked = []

    def stop_requested():
        asked.append(len(asked))
        return signum if len(asked) == STEPS + 3 else None  # in the second epoch

    with pytest.raises(raised):
        train(strategy, tmp_path, trainer_cfg(epochs=4), stop_requested=stop_requested)
    assert len(asked) == STEPS + 3  # it stopped at once
    assert read_state(tmp_path / "ckpt")["epoch"] == 1


def test_nan_loss_fails_naming_the_epoch_and_keeps_the_last_good_checkpoint(strategy, tmp_path):
    t = trainer_cfg(epochs=3)
    with pytest.raises(TrainingFailed, match=r"training loss became nan at epoch 3; lower optim"):
        train(strategy, tmp_path, t, callbacks=[PoisonAfter(2)])
    state = read_state(tmp_path / "ckpt")
    assert state["epoch"] == 2
    # The kept checkpoint is the good one: resuming from it finishes cleanly.
    _, result, _ = train(strategy, tmp_path, t, resume=True)
    assert result.epochs_completed == 3 and math.isfinite(result.history["loss"][0])


def test_absurd_learning_rate_fails_with_the_fix(strategy, tmp_path):
    # 1e6 only diverges to a huge finite loss on this tiny model; 1e12 reaches NaN in epoch 1.
    o = opt_cfg(name="sgd", lr=1e12, momentum=0.9)
    with pytest.raises(
        TrainingFailed, match=r"at epoch 1; lower optimizer.lr \(now 1000000000000.0\)"
    ):
        train(strategy, tmp_path, trainer_cfg(epochs=2), o)
    assert read_state(tmp_path / "ckpt") is None  # no good epoch to keep


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_with_float32_output(strategy, tmp_path, precision):
    set_precision(precision)
    try:
        model, result, data = train(strategy, tmp_path, trainer_cfg(epochs=1, precision=precision))
    finally:
        set_precision("float32")
    assert model.layers[0].compute_dtype == precision.removeprefix("mixed_")
    assert model.layers[0].kernel.dtype == "float32"  # variables stay float32
    assert model(next(iter(data.test))[0]).dtype == "float32"
    assert math.isfinite(result.history["loss"][0])
    loss_scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert loss_scaled == (precision == "mixed_float16")


def test_label_smoothing_without_validation(strategy, tmp_path):
    t = trainer_cfg(epochs=1, label_smoothing=0.1)
    model, result, data = train(strategy, tmp_path, t, val=False)
    assert isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    assert set(result.history) == {"loss", "accuracy", "lr"}
    assert result.best_epoch is None and result.best_val_accuracy is None
    metrics = evaluate(model, data.test)  # sparse labels, one-hot inside
    assert 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["loss"])


def lr_curve(opt, steps):
    values = []
    for step in steps:
        opt.iterations.assign(step)
        values.append(float(opt.learning_rate))
    return np.array(values)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    o = opt_cfg(lr=0.1, schedule="cosine", warmup_epochs=1, min_lr_fraction=0.1)
    opt = build_optimizer(o, steps_per_epoch=10, epochs=5, num_replicas=1)
    # Linear 0 -> 0.1 over 10 steps, then cosine over 40 steps to 0.01.
    expected = [0.0, 0.05, 0.1, 0.01 + 0.09 * 0.5, 0.01]
    np.testing.assert_allclose(lr_curve(opt, [0, 5, 10, 30, 50]), expected, atol=1e-7)


def test_one_cycle_rises_to_the_peak_at_30_percent_then_anneals():
    o = opt_cfg(lr=0.1, schedule="one_cycle", min_lr_fraction=0.0)
    opt = build_optimizer(o, steps_per_epoch=10, epochs=10, num_replicas=1)
    curve = lr_curve(opt, range(101))
    assert curve[0] == pytest.approx(0.1 / 25)
    assert int(np.argmax(curve)) == 30 and curve.max() == pytest.approx(0.1)
    assert np.all(np.diff(curve[:31]) > 0) and np.all(np.diff(curve[30:]) <= 0)
    assert curve[-1] == pytest.approx(0.0, abs=1e-9)


def test_constant_schedule_warmup_and_linear_scaling():
    o = opt_cfg(lr=0.1, warmup_epochs=0.5, scale_lr_with_replicas=True)
    opt = build_optimizer(o, steps_per_epoch=10, epochs=3, num_replicas=4)
    np.testing.assert_allclose(lr_curve(opt, [0, 1, 5, 6, 29]), [0, 0.08, 0.4, 0.4, 0.4], atol=1e-7)


def test_optimizer_settings_reach_keras():
    sgd = build_optimizer(
        opt_cfg(name="sgd", lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-4, clipnorm=1.0),
        steps_per_epoch=10,
        epochs=2,
        num_replicas=1,
    )
    assert isinstance(sgd, keras.optimizers.SGD)
    assert (sgd.momentum, sgd.nesterov, sgd.weight_decay, sgd.clipnorm) == (0.8, True, 5e-4, 1.0)
    adamw = build_optimizer(
        opt_cfg(name="adamw", weight_decay=1e-4, beta_2=0.99),
        steps_per_epoch=10,
        epochs=2,
        num_replicas=2,
    )
    assert isinstance(adamw, keras.optimizers.AdamW)
    assert (adamw.weight_decay, adamw.beta_2) == (1e-4, 0.99)
    assert float(adamw.learning_rate) == pytest.approx(3e-3)  # no scaling unless asked


def test_epoch_lr_log_follows_the_schedule(strategy, tmp_path):
    o = opt_cfg(lr=0.01, schedule="cosine")
    _, result, _ = train(strategy, tmp_path, trainer_cfg(epochs=2), o)
    # lr in effect at each epoch's end: half-way down the cosine, then its floor.
    np.testing.assert_allclose(result.history["lr"], [0.005, 0.0], atol=1e-7)


def test_checkpoint_state_is_json_with_the_files_it_names(strategy, tmp_path):
    train(strategy, tmp_path, trainer_cfg(epochs=1))
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["epoch"] == 1 and state["last"] == "epoch-0001.weights.h5"
    assert (tmp_path / "ckpt" / state["last"]).is_file()
    assert (tmp_path / "ckpt" / state["best"]).is_file()


class CheckpointFiles(keras.callbacks.Callback):
    """The weight files in the checkpoint directory after each epoch (runs after the trainer's
    own epoch hook, which writes them)."""

    def __init__(self, checkpoint_dir):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.after_epoch: list[list[str]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.after_epoch.append(sorted(p.name for p in self.checkpoint_dir.glob("*.weights.h5")))


@pytest.mark.parametrize("every_epoch", [True, False])
def test_checkpoint_every_epoch(strategy, tmp_path, every_epoch):
    """true: each epoch's model + optimizer state is written (the last one kept); false: no
    per-epoch file, only the best weights (by val_loss), and state.json names no 'last'."""
    files = CheckpointFiles(tmp_path / "ckpt")
    _, result, _ = train(
        strategy, tmp_path, trainer_cfg(checkpoint_every_epoch=every_epoch), callbacks=[files]
    )
    assert result.epochs_completed == 2
    per_epoch = [[f for f in names if f.startswith("epoch-")] for names in files.after_epoch]
    state = read_state(tmp_path / "ckpt")
    if every_epoch:
        assert per_epoch == [["epoch-0001.weights.h5"], ["epoch-0002.weights.h5"]]
        assert state["last"] == "epoch-0002.weights.h5"
    else:
        assert per_epoch == [[], []]
        assert state["last"] is None
    assert state["epoch"] == 2
    assert state["best"] == f"best-{result.best_epoch:04d}.weights.h5"
    assert all(any(f.startswith("best-") for f in names) for names in files.after_epoch)


def test_steps_per_execution_takes_effect_and_trains_the_same(strategy, tmp_path):
    """4 steps per call (19 steps per epoch: 4 full calls and a remainder of 3) give the same
    epochs and, up to float round-off, the same history as one step per call."""
    model, result, _ = train(strategy, tmp_path / "4", trainer_cfg(steps_per_execution=4))
    _, baseline, _ = train(strategy, tmp_path / "1", trainer_cfg(steps_per_execution=1))
    assert model.steps_per_execution == 4
    assert result.epochs_completed == baseline.epochs_completed == 2
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert result.history[key] == pytest.approx(baseline.history[key], rel=1e-4), key


def test_jit_compile_takes_effect_and_trains(strategy, tmp_path):
    model, result, _ = train(strategy, tmp_path, trainer_cfg(jit_compile=True))
    assert model.jit_compile is True  # Keras turns it off silently where XLA cannot compile
    assert result.epochs_completed == 2 and len(result.history["loss"]) == 2
    assert all(math.isfinite(x) for x in result.history["loss"])
    assert result.history["loss"][-1] < result.history["loss"][0]  # it learns
    assert result.history["val_accuracy"][-1] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.parametrize(
    "epochs, best",
    [
        # accuracy up by one image while the loss triples: the loss decides
        ([(0.30, 0.90), (0.90, 0.91)], 1),
        # equal loss: the higher accuracy breaks the tie
        ([(0.30, 0.90), (0.30, 0.92), (0.31, 0.99)], 2),
        # a non-finite loss is never the best
        ([(0.50, 0.80), (float("nan"), 0.95)], 1),
    ],
)
def test_the_best_epoch_is_the_lowest_validation_loss(tmp_path, epochs, best):
    """When validation accuracy and loss disagree, the recorded best epoch follows
    trainer.BEST_EPOCH_CRITERION (lowest val_loss; ties: highest val_accuracy)."""
    from convnets import trainer

    state = trainer._EpochState(
        tmp_path, None, save_last=False, writer=True, identity=None,
        throughput=trainer._Throughput(num_train=4),
    )  # fmt: skip
    # No model: which epoch is chosen is what is tested.
    state._save = lambda name, copy_of=None: name
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    state.set_model(model)
    state._commit = lambda: None
    for number, (loss, accuracy) in enumerate(epochs):
        state.on_epoch_end(number, {"loss": 0.1, "val_loss": loss, "val_accuracy": accuracy})
    assert state.best_epoch == best
    assert state.best_val_accuracy == epochs[best - 1][1]


def test_op_determinism_does_not_outlive_its_run():
    """Canary for TensorFlow's private switch (no public one turns op determinism off): a
    deterministic run, then one that is not, in the same process, as convnets.train allows."""
    from convnets.trainer import seed_everything

    assert callable(tf_config.disable_op_determinism)
    assert callable(tf_config.is_op_determinism_enabled)
    seed_everything(0, deterministic=True)
    assert tf_config.is_op_determinism_enabled()
    seed_everything(0, deterministic=False)
    assert not tf_config.is_op_determinism_enabled()


class CountingTraces(keras.Sequential):
    """``train_step`` runs in Python only while TensorFlow traces it: counting its calls
    counts the traces."""

    traces = 0

    def train_step(self, data):
        type(self).traces += 1
        return super().train_step(data)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["sparse", "one_hot"])
def test_on_one_device_the_train_step_is_traced_once(tmp_path, label_smoothing):
    """Variables made during a ``tf.function``'s first trace make TensorFlow trace it again;
    the optimizer and the metrics are built before ``fit`` so the train step is traced once
    (on the default strategy, the one a single-device run uses)."""
    t = trainer_cfg(label_smoothing=label_smoothing)
    data = digits_bundle(batch_size=t.batch_size, seed=t.seed)
    CountingTraces.traces = 0
    _, result = fit(
        lambda: CountingTraces(tiny_cnn().layers),
        data,
        t,
        opt_cfg(),
        tf.distribute.get_strategy(),
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert CountingTraces.traces == 1
    assert result.epochs_completed == 2 and result.history["loss"][-1] < result.history["loss"][0]
