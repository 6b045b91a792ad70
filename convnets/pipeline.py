"""The ``tf.data`` pipelines over a dataset's in-memory arrays (see :mod:`convnets.data`).

Training: shuffle (seeded, reshuffled each epoch), batch by the global batch size (the last,
smaller batch is dropped only where it would leave a replica without images; see
:func:`last_batch_leaves_a_replica_empty`), then augment
whole batches (vectorised ops instead of one call per image, on the compact uint8 cache) with
stateless random ops keyed by a seeded random stream that changes each epoch (so a run is
reproducible and still sees new crops every epoch), cast to float32 and prefetch. Evaluation:
batch in the arrays' order, cast, prefetch.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def last_batch_leaves_a_replica_empty(num_examples: int, batch_size: int, replicas: int) -> bool:
    """Whether an epoch's last, smaller batch would give one of ``replicas`` no images.

    ``tf.distribute`` splits a batch of ``r`` images into chunks of ``ceil(r / replicas)``,
    replica by replica, so a short last batch can leave the last replicas with none (3 images
    on 2 replicas: 2 and 1; 1 image: 1 and 0; 5 on 4: 2, 2, 1, 0). A replica with no images
    gives BatchNormalization the mean of nothing: NaN moving statistics that the replicas
    then average into every copy of the model (the run trains on and evaluates at chance), or,
    with TensorFlow's oneDNN kernels, an "Incompatible shapes" error. Dropping that one batch
    (fewer than ``batch_size`` images, different ones each epoch as the order is reshuffled)
    is the only change; a run whose last batch reaches every replica keeps all its images.
    tests/test_distribute.py checks the split against the strategy itself.
    """
    rest = num_examples % batch_size
    if replicas < 2 or rest == 0:
        return False
    chunk = -(-rest // replicas)  # ceil
    return rest <= (replicas - 1) * chunk


def evaluation_batch_size(num_examples: int, batch_size: int, replicas: int) -> int | None:
    """The batch an evaluation split is read in: ``batch_size``, or, where its last batch
    would leave one of several replicas without images (TensorFlow's oneDNN kernels then fail
    with "Incompatible shapes"), the nearest multiple of ``replicas`` whose last batch reaches
    every replica. Evaluation may take any batch: inference has no batch statistics, so the
    metrics are the same. None when no batch works (a split of a few images over many
    replicas)."""
    if not last_batch_leaves_a_replica_empty(num_examples, batch_size, replicas):
        return batch_size
    candidates = range(replicas, max(batch_size, num_examples) + replicas, replicas)
    for size in sorted(candidates, key=lambda c: (abs(c - batch_size), c)):
        if not last_batch_leaves_a_replica_empty(num_examples, size, replicas):
            return size
    return None


class Pipeline:
    """Builds the train and evaluation ``tf.data`` pipelines over in-memory arrays."""

    def __init__(
        self, augment, shuffle_buffer: int, batch_size: int, seed: int, deterministic: bool
    ):
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.pad = int(augment.random_crop_padding)
        self.flip = bool(augment.horizontal_flip)
        self.deterministic = deterministic

    def training(self, x: np.ndarray, y: np.ndarray, *, drop_last: bool = False) -> tf.data.Dataset:
        """``drop_last``: leave out each epoch's last, smaller batch."""
        ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
        ds = ds.shuffle(
            min(self.shuffle_buffer, len(y)), seed=self.seed, reshuffle_each_iteration=True
        ).batch(self.batch_size, drop_remainder=drop_last)
        if self.pad or self.flip:
            # One random int64 per batch, a new stream each epoch, reproducible from the seed.
            keys = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True)
            ds = tf.data.Dataset.zip((ds, keys)).map(
                lambda batch, key: self._to_float(*self._augment(batch, key)),
                num_parallel_calls=AUTOTUNE,
            )
        else:
            ds = ds.map(self._to_float, num_parallel_calls=AUTOTUNE)
        # Batches may leave the parallel map out of order unless deterministic (faster).
        return self._finish(ds, deterministic=self.deterministic)

    def evaluation(
        self, x: np.ndarray, y: np.ndarray, batch_size: int | None = None
    ) -> tf.data.Dataset:
        """Always in the arrays' order, so predictions line up with the labels of a rerun.
        ``batch_size``: default, the training batch."""
        ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
        ds = ds.batch(batch_size or self.batch_size)
        return self._finish(ds.map(self._to_float, num_parallel_calls=AUTOTUNE), deterministic=True)

    def _augment(self, batch, key):
        """Random crop of the zero-padded image and horizontal flip, per image, for a batch.

        Written with gathers over the whole batch rather than ``tf.image.stateless_random_crop``
        per image: one op per batch instead of one per image keeps the CPU pipeline well ahead
        of a GPU step (see benchmarks/pipeline.py).
        """
        images, labels = batch
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.stack([key, tf.constant(0, tf.int64)]), 2)
        )
        count = tf.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        # Each output pixel is a gather of the (padded) input: rows and columns per image,
        # a flip being columns in reverse order.
        rows = tf.broadcast_to(tf.range(height), [count, height])
        cols = tf.broadcast_to(tf.range(width), [count, width])
        if self.pad:
            pad = self.pad
            images = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
            offsets = tf.random.stateless_uniform(
                [count, 2], crop_seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32
            )
            rows = rows + offsets[:, :1]
            cols = cols + offsets[:, 1:]
            images = tf.gather(images, rows, axis=1, batch_dims=1)
        if self.flip:
            flip = tf.random.stateless_uniform([count], flip_seed) < 0.5
            cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
        return tf.gather(images, cols, axis=2, batch_dims=1), labels

    @staticmethod
    def _to_float(images, labels):
        return tf.cast(images, tf.float32), labels

    @staticmethod
    def _finish(ds: tf.data.Dataset, *, deterministic: bool) -> tf.data.Dataset:
        options = tf.data.Options()
        options.deterministic = deterministic
        # In-memory data has no files to shard: MultiWorkerMirroredStrategy shards by element
        # (every worker shuffles with the same seed, so the shards are disjoint).
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return ds.prefetch(AUTOTUNE).with_options(options)
