"""The Keras model agrees with the pure analysis: params, shapes, and a measured receptive field."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from keras.src.activations import ALL_OBJECTS_DICT  # noqa: E402
from test_architecture import model_cfg  # noqa: E402

from convnets.architecture import ACTIVATIONS, analyze, resolve_stack  # noqa: E402
from convnets.erf import effective_receptive_field  # noqa: E402
from convnets.errors import ConfigError  # noqa: E402
from convnets.model import (  # noqa: E402
    PixelScaling,
    build_model,
    feature_map_layers,
    feature_model,
    last_feature_map,
    normalise,
)

SHAPES = {
    "simple_cnn": [[8, 8, 1], [28, 28, 1]],  # digits, mnist
    "lenet5": [[28, 28, 1]],  # mnist / fashion_mnist
    "vgg_small": [[32, 32, 3], [28, 28, 1]],  # cifar, fashion_mnist
    "dilated": [[32, 32, 3], [8, 8, 1]],
    "allconv": [[32, 32, 3]],
}
CASES = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]


def assert_matches_keras(stack, shape, num_classes):
    """Total and per-row params and output shapes of the analysis equal Keras's."""
    analysis = analyze(stack, shape, num_classes)
    model = build_model(stack, shape, num_classes)
    assert analysis.param_count == model.count_params()
    for row in analysis.layers:
        layer = model.get_layer(row.name)
        assert row.params == layer.count_params(), row.name
        assert row.output_shape == tuple(layer.output.shape[1:]), row.name
    assert analysis.feature_shape == tuple(last_feature_map(model).shape[1:])
    return analysis, model


def test_activation_names_are_keras_activations():
    for name in ACTIVATIONS:
        keras.activations.get(name)
    # every Keras activation is accepted except glu (it halves the channels)
    assert set(ALL_OBJECTS_DICT) - ACTIVATIONS == {"glu"}


@pytest.mark.parametrize("name, shape", CASES, ids=[f"{n}-{s[0]}x{s[2]}" for n, s in CASES])
def test_shipped_models_match_keras(name, shape):
    analysis, model = assert_matches_keras(resolve_stack(model_cfg(name)), shape, 10)
    assert model.name == name
    assert model.output.shape[1:] == (10,) and model.output.dtype == "float32"


# ---------------------------------------------------------------- random stacks

pairs = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)).map(list))


@st.composite
def conv_layer(draw, *, linear=False):
    stride = draw(st.sampled_from([1, 1, 2, [1, 2]]))
    layer = {
        "filters": draw(st.integers(1, 3)),
        "kernel_size": draw(pairs),
        "stride": stride,
        "dilation": 1 if stride != 1 else draw(st.sampled_from([1, 2, [2, 1], 3])),
        "padding": draw(st.sampled_from(["same", "valid", 0, 1, 2])),
        "pool": draw(st.sampled_from([None, None, "avg"] if linear else [None, "max", "avg"])),
        "pool_size": draw(pairs),
        "pool_stride": draw(st.one_of(st.none(), pairs)),
    }
    if linear:
        layer.update(activation=None, batch_norm=False)
    else:
        layer.update(
            activation=draw(st.sampled_from(["relu", None, "gelu"])),
            batch_norm=draw(st.booleans()),
            dropout=draw(st.sampled_from([0.0, 0.2])),
        )
    return layer


def analysed(layers, shape, head=None):
    """The stack and its analysis, or a rejected example when the feature map shrinks."""
    stack = resolve_stack({"name": "random", "layers": layers, "head": head or {}})
    try:
        return stack, analyze(stack, shape, 3)
    except ConfigError:
        assume(False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(conv_layer(), min_size=1, max_size=3),
    hw=st.tuples(st.integers(6, 20), st.integers(6, 20)),
    channels=st.integers(1, 3),
    head=st.fixed_dictionaries(
        {
            "global_pool": st.sampled_from(["avg", "max", "flatten"]),
            "dense": st.lists(st.integers(1, 4), max_size=2),
            "dropout": st.sampled_from([0.0, 0.5]),
        }
    ),
)
def test_random_stacks_match_keras(layers, hw, channels, head):
    shape = [*hw, channels]
    stack, _ = analysed(layers, shape, head)
    assert_matches_keras(stack, shape, 3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(conv_layer(linear=True), min_size=1, max_size=4),
    hw=st.tuples(st.integers(16, 40), st.integers(16, 40)),
)
def test_receptive_field_matches_brute_force(layers, hw):
    """Which input pixels change one unit of the last feature map of the built model?

    All weights positive, no bias, no activation or batch norm, average pooling: every
    path from a pixel in the receptive field to the unit has a positive weight, so the
    gradient is non-zero exactly on the pixels the unit sees (zero on holes of dilated or
    skipping kernels, but the extent is the receptive field). The unit is one whose
    theoretical field lies inside the input, so padding cannot clip it; its position checks
    ``start`` and ``jump`` too.
    """
    shape = [*hw, 1]
    stack, a = analysed(layers, shape)
    rf, jump, start = a.receptive_field_hw, a.layers[-3].jump, a.layers[-3].start
    assert a.layers[-3].output_shape == a.feature_shape  # the last spatial row
    unit = []
    for axis in range(2):
        half = (rf[axis] - 1) / 2
        inside = [
            i
            for i in range(a.feature_shape[axis])
            if start[axis] + i * jump[axis] - half >= 0
            and start[axis] + i * jump[axis] + half <= shape[axis] - 1
        ]
        assume(inside)
        unit.append(inside[len(inside) // 2])

    features = feature_model(build_model(stack, shape, 3))
    for layer in features.layers:
        if layer.weights:
            layer.set_weights([np.ones(w.shape, "float32") for w in layer.get_weights()])
    image = tf.random.uniform([1, *shape], 0.5, 1.5, seed=0)
    with tf.GradientTape() as tape:
        tape.watch(image)
        out = features(image)[0, unit[0], unit[1], 0]
    seen = tape.gradient(out, image)[0, :, :, 0].numpy() != 0
    for axis in range(2):
        hit = np.flatnonzero(seen.any(axis=1 - axis))
        centre = start[axis] + unit[axis] * jump[axis]
        assert hit.min() == centre - (rf[axis] - 1) / 2
        assert hit.max() - hit.min() + 1 == rf[axis]


# ---------------------------------------------------------------- builder details


def test_int_padding_uses_zero_padding_and_bn_drops_the_bias():
    stack = resolve_stack(
        {"layers": [{"filters": 4, "padding": 2, "pool": "max", "dropout": 0.1}, {"filters": 2}]}
    )
    model = build_model(stack, [8, 8, 1], 5, name="custom")
    names = [layer.name for layer in model.layers]
    assert names == [
        "image",
        "block1_pad",
        "block1_conv",
        "block1_bn",
        "block1_act",
        "block1_drop",
        "block1_pool",
        "block2_conv",
        "block2_bn",
        "block2_act",
        "head_pool",
        "classifier",
        "probabilities",
    ]
    assert model.name == "custom"
    assert model.get_layer("block1_conv").use_bias is False
    assert model.get_layer("block1_conv").padding == "valid"
    assert model.get_layer("block1_bn").momentum == 0.9
    assert feature_map_layers(model) == ["block1_pool", "block2_act"]


def test_sync_batch_norm_and_seeded_initialisation():
    stack = resolve_stack({"layers": [{"filters": 3}], "head": {"dense": [4]}})
    keras.utils.set_random_seed(7)
    first = build_model(stack, [8, 8, 1], 3, sync_batch_norm=True)
    keras.utils.set_random_seed(7)
    second = build_model(stack, [8, 8, 1], 3)
    assert first.get_layer("block1_bn").synchronized is True
    assert second.get_layer("block1_bn").synchronized is False
    for w1, w2 in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(w1, w2)
    probs = first(np.ones([2, 8, 8, 1], "float32"), training=False).numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_mixed_precision_keeps_float32_probabilities():
    stack = resolve_stack({"layers": [{"filters": 3}]})
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_model(stack, [8, 8, 1], 3)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.get_layer("block1_conv").compute_dtype == "bfloat16"
    assert model.output.dtype == "float32"


def test_pixel_scaling_puts_the_normalisation_in_the_model():
    """The model takes stored pixels: same outputs as the bare stack on normalised ones, no
    extra params, float32 even under mixed precision, and features from normalised input."""
    stack = resolve_stack({"layers": [{"filters": 3}, {"filters": 4, "pool": "max"}]})
    scaling = PixelScaling(255.0, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1))
    keras.utils.set_random_seed(1)
    raw_model = build_model(stack, [8, 8, 3], 5, pixel_scaling=scaling)
    keras.utils.set_random_seed(1)
    bare = build_model(stack, [8, 8, 3], 5)
    assert (
        raw_model.count_params() == bare.count_params() == analyze(stack, [8, 8, 3], 5).param_count
    )
    pixels = np.random.default_rng(0).integers(0, 256, [4, 8, 8, 3]).astype("float32")
    normalised = (pixels / 255.0 - np.array(scaling.mean)) / np.array(scaling.std)
    np.testing.assert_allclose(normalise(raw_model, pixels), normalised, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        raw_model(pixels, training=False), bare(normalised, training=False), atol=1e-5
    )
    np.testing.assert_allclose(
        feature_model(raw_model)(normalised), feature_model(bare)(normalised), atol=1e-5
    )
    # The effective receptive field is measured on the normalised image either way.
    np.testing.assert_allclose(
        effective_receptive_field(raw_model, pixels).grad_map,
        effective_receptive_field(bare, normalised).grad_map,
        rtol=1e-4,
        atol=1e-6,
    )
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        mixed = build_model(stack, [8, 8, 3], 5, pixel_scaling=scaling)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert mixed.input.dtype == "float32"
    assert mixed.get_layer("preprocess").compute_dtype == "float32"
    assert mixed.get_layer("block1_conv").compute_dtype == "float16"
