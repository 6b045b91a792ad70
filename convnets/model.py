"""A resolved :class:`~convnets.architecture.Stack` -> a Keras 3 functional model.

Layer names follow the analysis table (``block{i}_conv``, ``block{i}_pool``, ``head_pool``,
``dense{j}``, ``classifier``; ``i`` is 1-based, ``model.layers[i-1]`` in the config), so the
tests can compare :func:`convnets.architecture.analyze` with Keras row by row.

Weights come from Keras's seeded initialisers: call ``keras.utils.set_random_seed(seed)``
before :func:`build_model` for reproducible initial weights.
"""

from __future__ import annotations

import keras

from convnets.architecture import Stack, parse_input_shape

# Keras's default BN momentum (0.99) averages the moving statistics over ~100s of steps
# and starts them at mean 0 / variance 1, so after a short run (a few hundred steps, e.g.
# digits) they are still far from the data and the model evaluates badly in inference mode
# although it trains well. 0.9 (PyTorch's 0.1 and TF-slim's default) tracks them in ~tens
# of steps and costs nothing on long runs.
BN_MOMENTUM = 0.9

_POOLS = {"max": keras.layers.MaxPooling2D, "avg": keras.layers.AveragePooling2D}
_HEAD_POOLS = {
    "avg": keras.layers.GlobalAveragePooling2D,
    "max": keras.layers.GlobalMaxPooling2D,
    "flatten": keras.layers.Flatten,
}


def build_model(
    stack: Stack,
    input_shape,
    num_classes: int,
    *,
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
    """
    shape = parse_input_shape(input_shape)
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    for layer in stack.layers:
        block = f"block{layer.index + 1}"
        padding = layer.padding
        if isinstance(padding, int):
            x = keras.layers.ZeroPadding2D(padding, name=f"{block}_pad")(x)
            padding = "valid"
        x = keras.layers.Conv2D(
            layer.filters,
            layer.kernel_size,
            strides=layer.stride,
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


def feature_model(model: keras.Model) -> keras.Model:
    """A sub-model sharing ``model``'s weights, from its input to :func:`last_feature_map`."""
    return keras.Model(model.inputs, last_feature_map(model), name=f"{model.name}_features")
