"""Subprocess half of the distribution tests, and the tiny digits data and model that the
trainer and distribute tests share (so every test trains exactly the same thing).

Usage (from the repository root, the package importable):

    TF_CONFIG=... python tests/multiworker_worker.py multi_worker CHECKPOINT_DIR RESULT_JSON
    python tests/multiworker_worker.py mirrored CHECKPOINT_DIR RESULT_JSON

``multi_worker``: one worker of a MultiWorkerMirroredStrategy cluster; trains 2 epochs through
``convnets.trainer.fit`` and writes its history, test metrics and a digest of the final weights.
``mirrored``: splits the CPU into 2 logical devices (only possible in a fresh process) and
trains the same model on one device and under MirroredStrategy, without and with batch norm
(synchronized across the replicas), writing every run's history and test metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from convnets import distribute, trainer  # noqa: E402
from convnets.config import DistributeConfig, OptimizerConfig, TrainerConfig  # noqa: E402
from convnets.pipeline import last_batch_leaves_a_replica_empty  # noqa: E402

NUM_TRAIN, NUM_VAL = 1200, 297  # of digits' 1797 images; the remaining 300 are the test split


def digits_bundle(
    *, batch_size: int, seed: int, val: bool = True, num_train: int = NUM_TRAIN, replicas: int = 1
) -> SimpleNamespace:
    """Digits (8x8x1, 10 classes) shaped like ``convnets.data.DataBundle``: seeded shuffle,
    reshuffled each epoch, global batches. Built here (not with convnets.data) so these
    tests exercise only the trainer; only the rule for a last batch that would leave one of
    ``replicas`` empty is the package's. ``num_train``: the first images of the training
    split. Seeds TensorFlow first: a shuffle's seed pair depends on
    whether a global seed is set, so otherwise the first bundle in a process would differ."""
    trainer.seed_everything(seed, deterministic=False)
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype("float32")
    y = digits.target.astype("int32")

    drop_last = last_batch_leaves_a_replica_empty(num_train, batch_size, replicas)

    def split(lo: int, hi: int, shuffle: bool = False) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x[lo:hi], y[lo:hi]))
        if shuffle:
            ds = ds.shuffle(hi - lo, seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size, drop_remainder=shuffle and drop_last)

    end_val = NUM_TRAIN + NUM_VAL
    return SimpleNamespace(
        train=split(0, num_train, shuffle=True),
        train_dropped_per_epoch=num_train % batch_size if drop_last else 0,
        val=split(NUM_TRAIN, end_val) if val else None,
        test=split(end_val, len(x)),
        input_shape=(8, 8, 1),
        num_classes=10,
        num_train=num_train,
        num_val=NUM_VAL if val else 0,
        num_test=len(x) - end_val,
    )


def tiny_cnn(batch_norm: str | None = None) -> keras.Model:
    """Conv -> [BN] -> relu -> flatten -> softmax (float32, like convnets.model's output).

    ``batch_norm``: None, "plain" (per-replica statistics) or "sync" (over all replicas).
    """
    layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, use_bias=batch_norm is None)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(synchronized=batch_norm == "sync"))
    layers += [
        keras.layers.Activation("relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax", dtype="float32", name="probabilities"),
    ]
    return keras.Sequential(layers)


def train(
    strategy,
    checkpoint_dir: str,
    batch_norm: str | None = None,
    num_train: int = NUM_TRAIN,
    restore_best: bool = True,
) -> dict:
    """2 epochs of Adam on digits, deterministic; the record the tests compare."""
    trainer_cfg = OmegaConf.structured(
        TrainerConfig(
            epochs=2, batch_size=64, seed=1, deterministic=True, verbose=0,
            restore_best=restore_best,
        )
    )  # fmt: skip
    opt_cfg = OmegaConf.structured(OptimizerConfig(name="adam", lr=3e-3))
    data = digits_bundle(
        batch_size=trainer_cfg.batch_size,
        seed=trainer_cfg.seed,
        num_train=num_train,
        replicas=strategy.num_replicas_in_sync,
    )
    model, result = trainer.fit(
        lambda: tiny_cnn(batch_norm),
        data,
        trainer_cfg,
        opt_cfg,
        strategy,
        checkpoint_dir=checkpoint_dir,
    )
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(keras.ops.convert_to_numpy(weights).tobytes())
    # The same weights on one device: what a saved or logged copy of the model scores.
    copy = tiny_cnn(batch_norm and "plain")
    copy.set_weights(model.get_weights())
    copy.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return {
        "one_device_copy": {
            "test": trainer.evaluate(copy, data.test),
            "val_loss": trainer.evaluate(copy, data.val)["loss"] if data.val is not None else None,
        },
        "num_replicas": strategy.num_replicas_in_sync,
        "history": result.history,
        "epochs_completed": result.epochs_completed,
        "test": trainer.evaluate(model, data.test),
        "weights_sha256": digest.hexdigest(),
        "weights_finite": all(
            bool(np.isfinite(keras.ops.convert_to_numpy(w)).all()) for w in model.get_weights()
        ),
        "train_dropped_per_epoch": data.train_dropped_per_epoch,
    }


def replica_split_mismatches(strategy) -> list[tuple[int, int, list[int]]]:
    """Where ``last_batch_leaves_a_replica_empty`` disagrees with how ``strategy`` really
    splits a last batch of ``rest`` images: (batch size, rest, images per replica)."""
    replicas = strategy.num_replicas_in_sync
    wrong = []
    for batch_size in (replicas, 2 * replicas, 4 * replicas):
        for rest in range(1, batch_size):
            batches = tf.data.Dataset.range(rest).batch(batch_size)
            first = next(iter(strategy.experimental_distribute_dataset(batches)))
            sizes = [int(tf.shape(t)[0]) for t in strategy.experimental_local_results(first)]
            if (0 in sizes) != last_batch_leaves_a_replica_empty(rest, batch_size, replicas):
                wrong.append((batch_size, rest, sizes))
    return wrong


def main(mode: str, checkpoint_dir: str, result_path: str) -> None:
    if mode == "multi_worker":
        dist_cfg = OmegaConf.structured(DistributeConfig(strategy="multi_worker"))
        distribute.configure_devices(dist_cfg)
        # Before anything else runs: the collective runtime is set up at TensorFlow's start.
        result = train(distribute.make_strategy(dist_cfg), checkpoint_dir)
    elif mode == "mirrored":
        mirrored = OmegaConf.structured(DistributeConfig(strategy="mirrored", cpu_replicas=2))
        distribute.configure_devices(mirrored)
        # An explicit device gives OneDeviceStrategy: one replica through the same distributed
        # input path as mirrored, so the two see batches in the same order.
        one = distribute.make_strategy(
            OmegaConf.structured(DistributeConfig("one_device", devices=["/cpu:0"]))
        )
        two = distribute.make_strategy(mirrored)
        result = {
            f"{name}/{bn}": train(strategy, os.path.join(checkpoint_dir, f"{name}-{bn}"), bn)
            for name, strategy, bns in [
                ("one_device", one, [None, "plain"]),
                ("mirrored", two, [None, "sync"]),
            ]
            for bn in bns
        }
        # A last batch of one image: with per-replica batch norm, the second replica would
        # get none (NaN statistics, or oneDNN's "Incompatible shapes").
        uneven = 18 * 64 + 1
        # Without restoring the best epoch: the model tested is the one of the last epoch.
        result["mirrored/uneven"] = train(
            two, os.path.join(checkpoint_dir, "uneven"), "plain", uneven, restore_best=False
        )
        result["split_mismatches"] = replica_split_mismatches(two)
    else:
        raise SystemExit(f"unknown mode {mode!r}: multi_worker | mirrored")
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
