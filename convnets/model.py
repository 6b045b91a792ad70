"""A resolved :class:`~convnets.architecture.Stack` -> a Keras 3 functional model.

Layer names follow the analysis table (``block{i}_conv``, ``block{i}_pool``, ``head_pool``,
``dense{j}``, ``classifier``; ``i`` is 1-based, ``model.layers[i-1]`` in the config), so the
tests can compare :func:`convnets.architecture.analyze` with Keras row by row.

Weights come from Keras's seeded initialisers: call ``keras.utils.set_random_seed(seed)``
before :func:`build_model` for reproducible initial weights.

Given a :class:`PixelScaling`, the model starts with its own input normalisation (a
``preprocess`` Rescaling layer), so it takes images as the dataset stores them (digits' 0..16,
uint8 0..255) and a saved or served model needs no preprocessing code from this project.

A strided 1x1 convolution is built as its two steps: ``block{i}_subsample`` (a 1x1 average
pooling with the layer's stride, which keeps every ``stride``-th pixel unchanged) and then the
1x1 convolution at unit stride; the same function, weights and output shape. TensorFlow 2.21's
oneDNN kernel for the weight gradient of a strided 1x1 convolution corrupts memory on AVX-512
CPUs for common shapes (odd batches, odd feature maps: heap corruption, aborts, or silently
wrong gradients); oneDNN's own "reduce to unit stride" copy inside that kernel is what this
builds explicitly, so the broken kernel is never reached. Capping oneDNN at AVX2 also avoids
it but costs a quarter of the training throughput (``benchmarks/README.md``).
tests/test_onednn.py re-checks the kernel on every run of the suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras

from convnets.architecture import Stack, parse_input_shape

# Keras's default BN momentum (0.99) averages the moving statistics over ~100s of steps
# and starts them at mean 0 / variance 1, so after a short run (a few hundred steps, e.g.
# digits) they are still far from the data and the model evaluates badly in inference mode
# although it trains well. 0.9 (PyTorch's 0.1 and TF-slim's default) tracks them in ~tens
# of steps and costs nothing on long runs.
BN_MOMENTUM = 0.9

_POOLS = {"max": keras.layers.MaxPooling2D, "avg": keras.layers.AveragePooling2D}
PREPROCESS = "preprocess"  # the name of the normalisation layer at the model's start
_HEAD_POOLS = {
    "avg": keras.layers.GlobalAveragePooling2D,
    "max": keras.layers.GlobalMaxPooling2D,
    "flatten": keras.layers.Flatten,
}


@dataclass(frozen=True)
class PixelScaling:
    """Stored pixels -> model input: ``(x / max_pixel_value - mean) / std`` per channel."""

    max_pixel_value: float
    mean: Sequence[float]
    std: Sequence[float]

    def layer(self) -> keras.layers.Rescaling:
        """The normalisation as one multiply-add (``scale * x + offset``), no weights.

        float32 whatever the global dtype policy: under mixed precision the raw values (up to
        255) and the normalised ones keep full precision, and the first conv casts its input.
        """
        scale = [1.0 / (self.max_pixel_value * s) for s in self.std]
        offset = [-m / s for m, s in zip(self.mean, self.std, strict=True)]
        return keras.layers.Rescaling(scale, offset, dtype="float32", name=PREPROCESS)


def build_model(
    stack: Stack,
    input_shape,
    num_classes: int,
    *,
    pixel_scaling: PixelScaling | None = None,
    sync_batch_norm: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Build the Keras model of ``stack``; its output is softmax probabilities in float32.

    Per config layer: [``block{i}_pad`` ZeroPadding2D for int padding] -> ``block{i}_conv``
    (no bias when batch-normed) -> [``block{i}_bn``] -> [``block{i}_act``] ->
    [``block{i}_drop``] -> [``block{i}_pool``]. Head: ``head_pool`` -> [``head_drop``] ->
    ``dense{j}`` (relu) -> ``classifier`` (logits) -> ``probabilities`` (softmax, float32 so
    mixed precision stays numerically safe; Keras's TF backend recovers the logits from it
    for the cross-entropy). ``sync_batch_norm`` computes batch statistics over all replicas.

    ``pixel_scaling`` puts the ``preprocess`` normalisation first: the model's float32 input is
    then the raw pixel values. Without it the input is already normalised (analysis tools).
    """
    shape = parse_input_shape(input_shape)
    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = inputs if pixel_scaling is None else pixel_scaling.layer()(inputs)
    for layer in stack.layers:
        block = f"block{layer.index + 1}"
        padding = layer.padding
        if isinstance(padding, int):
            x = keras.layers.ZeroPadding2D(padding, name=f"{block}_pad")(x)
            padding = "valid"
        stride = layer.stride
        if _subsample_first(layer.kernel_size, stride):
            # A 1x1 kernel needs no padding: "same" and "valid" both give ceil(size / stride).
            x = keras.layers.AveragePooling2D(1, stride, name=f"{block}_subsample")(x)
            stride, padding = 1, "valid"
        x = keras.layers.Conv2D(
            layer.filters,
            layer.kernel_size,
            strides=stride,
            padding=padding,
            dilation_rate=layer.dilation,
            use_bias=not layer.batch_norm,
            name=f"{block}_conv",
        )(x)
        if layer.batch_norm:
            x = keras.layers.BatchNormalization(
                momentum=BN_MOMENTUM, synchronized=sync_batch_norm, name=f"{block}_bn"
            )(x)
        if layer.activation is not None:
            x = keras.layers.Activation(layer.activation, name=f"{block}_act")(x)
        if layer.dropout > 0:
            x = keras.layers.Dropout(layer.dropout, name=f"{block}_drop")(x)
        if layer.pool is not None:
            x = _POOLS[layer.pool](layer.pool_size, layer.pool_stride, name=f"{block}_pool")(x)

    head = stack.head
    x = _HEAD_POOLS[head.global_pool](name="head_pool")(x)
    if head.dropout > 0:
        x = keras.layers.Dropout(head.dropout, name="head_drop")(x)
    for j, units in enumerate(head.dense, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{j}")(x)
    x = keras.layers.Dense(num_classes, name="classifier")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name or stack.name)


def _subsample_first(kernel_size, stride) -> bool:
    """Whether the layer is a strided 1x1 convolution, built as subsampling + a 1x1 conv."""
    return tuple(kernel_size) == (1, 1) and tuple(stride) != (1, 1)


def feature_map_layers(model: keras.Model) -> list[str]:
    """Name of the last layer of each conv block, in order.

    That layer's output is the block's feature map: after activation, dropout (identity at
    inference) and pooling, i.e. exactly what the next block (or the head) receives.
    """
    last: dict[str, str] = {}
    for layer in model.layers:
        block, _, _ = layer.name.partition("_")
        if block.startswith("block") and block[5:].isdigit():
            last[block] = layer.name  # layers come in graph order: the last one wins
    return list(last.values())


def last_feature_map(model: keras.Model) -> keras.KerasTensor:
    """The last spatial feature map: the input of ``head_pool``."""
    return model.get_layer("head_pool").input


def normalised_input(model: keras.Model) -> keras.KerasTensor:
    """What the conv stack receives: the ``preprocess`` layer's output, else the model input."""
    if PREPROCESS in {layer.name for layer in model.layers}:
        return model.get_layer(PREPROCESS).output
    return model.inputs[0]


def normalise(model: keras.Model, images):
    """``images`` (raw pixels) as the conv stack receives them: through ``preprocess`` if any."""
    if PREPROCESS in {layer.name for layer in model.layers}:
        return model.get_layer(PREPROCESS)(images)
    return images


def feature_model(model: keras.Model) -> keras.Model:
    """A sub-model sharing ``model``'s weights, from :func:`normalised_input` to
    :func:`last_feature_map` (so gradients are taken w.r.t. the normalised image)."""
    return keras.Model(
        normalised_input(model), last_feature_map(model), name=f"{model.name}_features"
    )
