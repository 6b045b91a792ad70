"""Pure architecture analysis: resolution, validation, warnings, and published figures.

No TensorFlow in this file; the agreement with Keras (params, shapes, brute-force receptive
field) is in test_model.py.
"""

from pathlib import Path

import pytest
from conftest import heavy_modules_loaded
from omegaconf import OmegaConf

from convnets.architecture import (
    analysis_to_dict,
    analyze,
    format_table,
    resolve_stack,
)
from convnets.config import ModelConfig
from convnets.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["simple_cnn", "lenet5", "vgg_small", "dilated", "allconv"]


def model_cfg(name: str):
    """A shipped model composed against the schema, as Hydra would."""
    return OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"),
    )


def last_spatial(a):
    return [row for row in a.layers if row.receptive_field is not None][-1]


def stack_of(layers, defaults=None, head=None, width=1.0):
    cfg = {"name": "t", "width": width, "layers": layers}
    if defaults is not None:
        cfg["layer_defaults"] = defaults
    if head is not None:
        cfg["head"] = head
    return resolve_stack(cfg)


def test_importing_architecture_does_not_load_tensorflow():
    loaded = heavy_modules_loaded(
        "convnets.architecture, convnets.inspection", ("tensorflow", "keras")
    )
    assert not loaded, loaded


# ---------------------------------------------------------------- resolution


def test_missing_layer_fields_fall_back_to_layer_defaults_in_the_schema():
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        {
            "name": "m",
            "width": 0.5,
            "layer_defaults": {"kernel_size": [3, 5], "pool": "max", "activation": None},
            "layers": [{"filters": 5}, {"filters": 1, "pool": None, "padding": 2, "stride": 2}],
        },
    )
    first, second = resolve_stack(cfg).layers
    # width 0.5: 2.5 rounds half up to 3; 0.5 rounds to 1 (and never below 1)
    assert (first.filters, second.filters) == (3, 1)
    assert first.kernel_size == second.kernel_size == (3, 5)
    assert (first.pool, second.pool) == ("max", None)  # explicit null overrides the default
    assert first.activation is None
    assert (second.padding, second.stride, first.stride) == (2, (2, 2), (1, 1))
    assert first.pool_stride == first.pool_size == (2, 2)  # pool_stride null = pool_size


@pytest.mark.parametrize(
    "layers, defaults, message",
    [
        ([{"filters": 8, "kernel_size": "abc"}], None,
         "model.layers[0]: kernel_size must be a positive int or [h, w], got 'abc'; use e.g. kernel_size: 3 or [3, 5]"),
        ([{"filters": 8}, {"filters": 8, "stride": [0, 1]}], None,
         "model.layers[1]: stride must be positive, got [0, 1]; use e.g. stride: 3 or [3, 5]"),
        ([{"filters": 0}], None, "model.layers[0]: filters must be a positive int, got 0"),
        ([{"filters": 8}], {"padding": "full"},
         "model.layer_defaults: padding must be same, valid or an int >= 0 (zeros on each side), got 'full'"),
        ([{"filters": 8, "pool": "median"}], None,
         "model.layers[0]: pool must be max, avg or null, got 'median'"),
        ([{"filters": 8, "activation": "rleu"}], None,
         "model.layers[0]: unknown activation 'rleu'; use a Keras activation name (relu, gelu, silu, tanh, elu, leaky_relu, ...) or null for linear"),
        ([{"filters": 8, "stride": 2, "dilation": 2}], None,
         "model.layers[0]: stride 2 with dilation 2 is not supported (Keras refuses stride > 1 together with dilation > 1); set stride: 1 or dilation: 1"),
        ([{"filters": 8, "dropout": 1.0}], None,
         "model.layers[0]: dropout must be a number in [0, 1), got 1.0"),
        ([{"filtres": 8}], None,
         "model.layers[0]: unknown key 'filtres'; known keys: filters, kernel_size, stride, padding, dilation, activation, batch_norm, dropout, pool, pool_size, pool_stride"),
        ([], None,
         "model.layers: the stack has no Conv2D layers; declare at least one, e.g. model.layers=[{filters:32}]"),
    ],
)  # fmt: skip
def test_invalid_stacks_name_the_layer_and_the_fix(layers, defaults, message):
    with pytest.raises(ConfigError) as err:
        stack_of(layers, defaults)
    assert str(err.value) == message


def test_shrinking_feature_maps_are_refused_with_the_layer_and_the_input():
    stack = stack_of([{"filters": 4}, {"filters": 4, "kernel_size": 5, "padding": "valid",
                      "pool": "max"}, {"filters": 4, "kernel_size": 5, "padding": "valid"}])  # fmt: skip
    analyze(stack, [16, 16, 1], 10)  # 16 -> 12 -> 6 -> 2
    with pytest.raises(ConfigError) as err:
        analyze(stack, [8, 8, 1], 10)  # 8 -> 4 -> 2 -> -2
    assert str(err.value) == (
        "model.layers[2]: the feature map shrinks to 0x0 at input 8x8x1 (kernel 5, padding "
        "valid); use padding: same, a smaller kernel/stride, or fewer downsampling layers"
    )
    pooled = stack_of([{"filters": 4, "pool": "avg", "pool_size": [3, 1]}])
    with pytest.raises(ConfigError, match=r"^model.layers\[0\]: the feature map shrinks to 0x2"):
        analyze(pooled, [2, 2, 1], 10)


# ---------------------------------------------------------------- recurrence


def test_dilation_grows_the_receptive_field_at_constant_params():
    """The shipped ``dilated`` stack (Yu & Koltun 2016 style): RF 3, 5, 9, 17, 33, 35."""
    a = analyze(resolve_stack(model_cfg("dilated")), [32, 32, 3], 10)
    convs = [r for r in a.layers if r.kind == "conv"]
    assert [r.receptive_field[0] for r in convs] == [3, 5, 9, 17, 33, 35]
    assert {r.params for r in convs[1:]} == {3 * 3 * 32 * 32}
    assert a.receptive_field >= 32 and not a.warnings


def test_same_padding_start_follows_tensorflow_padding():
    """``same`` pads (k-1)//2-ish before, depending on the input size: TF's rule."""
    a = analyze(stack_of([{"filters": 1, "stride": 2, "kernel_size": 3}]), [8, 9, 1], 2)
    conv = a.layers[0]
    # H=8: out 4, total pad (4-1)*2+3-8 = 1, before 0 -> first centre at pixel 1.
    # W=9: out 5, total pad (5-1)*2+3-9 = 2, before 1 -> first centre at pixel 0.
    assert conv.output_shape[:2] == (4, 5)
    assert conv.start == (1.0, 0.0) and conv.jump == (2, 2) and conv.receptive_field == (3, 3)
    explicit = analyze(stack_of([{"filters": 1, "kernel_size": 5, "padding": 1}]), [8, 8, 1], 2)
    assert explicit.layers[0].start == (1.0, 1.0)  # centre 2 in the padded map = pixel 1
    assert explicit.layers[0].output_shape == (6, 6, 1)


def test_non_square_kernels_report_both_sides():
    a = analyze(stack_of([{"filters": 2, "kernel_size": [1, 7], "padding": "valid"}]), [5, 9, 1], 3)
    assert a.receptive_field_hw == (1, 7) and a.receptive_field == 7
    assert a.feature_shape == (5, 3, 2)


# ---------------------------------------------------------------- published architectures


def vgg16():
    """VGG-16 (configuration D of Simonyan & Zisserman 2015, Table 1), 224x224x3."""
    layers = []
    for width, n in [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]:
        layers += [{"filters": width} for _ in range(n - 1)] + [{"filters": width, "pool": "max"}]
    return stack_of(
        layers, {"batch_norm": False}, {"global_pool": "flatten", "dense": [4096, 4096]}
    )


def test_vgg16_params_macs_and_receptive_field():
    a = analyze(vgg16(), [224, 224, 3], 1000)
    # keras.applications.VGG16(weights=None).count_params() and torchvision's
    # VGG16_Weights.IMAGENET1K_V1 meta: num_params 138,357,544, "GFLOPS" 15.47 (multiply-adds).
    assert a.param_count == 138_357_544
    assert round(a.macs / 1e9, 2) == 15.47
    # Araujo et al., Distill 2019, Table 1: VGG 16 receptive field 212, effective stride 32,
    # effective padding 90 (= (r - 1) / 2 minus the centre of the first unit).
    assert a.receptive_field == 212 and last_spatial(a).jump == (32, 32)
    assert (a.receptive_field - 1) / 2 - last_spatial(a).start[0] == 90
    assert a.feature_shape == (7, 7, 512)


def test_alexnet_params_macs_and_receptive_field():
    """AlexNet as in torchvision (Krizhevsky 2014, "One weird trick", single-tower), 224x224x3."""
    stack = stack_of(
        [
            {"filters": 64, "kernel_size": 11, "stride": 4, "padding": 2, "pool": "max"},
            {"filters": 192, "kernel_size": 5, "padding": 2, "pool": "max"},
            {"filters": 384},
            {"filters": 256},
            {"filters": 256, "pool": "max"},
        ],
        {"batch_norm": False, "padding": 1, "pool_size": 3, "pool_stride": 2},
        {"global_pool": "flatten", "dense": [4096, 4096]},
    )
    a = analyze(stack, [224, 224, 3], 1000)
    # torchvision AlexNet_Weights.IMAGENET1K_V1 meta: num_params 61,100,840, "GFLOPS" 0.71.
    assert a.param_count == 61_100_840
    assert round(a.macs / 1e9, 2) == 0.71
    assert a.feature_shape == (6, 6, 256)
    # Araujo et al., Distill 2019, Table 1: AlexNet receptive field 195, effective stride 32.
    assert a.receptive_field == 195 and last_spatial(a).jump == (32, 32)


def test_lenet5_params_and_connections():
    """LeNet-5 (LeCun et al. 1998, Fig. 2 and section II.B) on its 32x32 input.

    61,706 params is the paper's layer sizes with C3 fully connected to S2 (the paper wires a
    subset: 60k) and parameter-free subsampling: C1 156 + C3 2,416 + C5 48,120 + F6 10,164 +
    output 850, the figure Keras and PyTorch report for the usual reimplementation. The
    paper's connection counts (C1 122,304, C5 48,120, F6 10,164) include one bias add per
    output, which MACs leave out.
    """
    stack = stack_of(
        [{"filters": 6, "pool": "avg"}, {"filters": 16, "pool": "avg"}, {"filters": 120}],
        {"kernel_size": 5, "padding": "valid", "activation": "tanh", "batch_norm": False},
        {"global_pool": "flatten", "dense": [84]},
    )
    a = analyze(stack, [32, 32, 1], 10)
    rows = {r.name: r for r in a.layers}
    assert a.param_count == 61_706
    assert rows["block1_conv"].params == 156 and rows["block2_conv"].params == 2_416
    assert rows["block1_conv"].macs == 122_304 - 28 * 28 * 6
    assert rows["block3_conv"].macs == 48_120 - 120
    assert rows["dense1"].macs == 10_164 - 84
    assert a.receptive_field == 32 and a.feature_shape == (1, 1, 120)
    # the shipped lenet5 (padding 2 on 28x28) is the same network
    assert analyze(resolve_stack(model_cfg("lenet5")), [28, 28, 1], 10).param_count == 61_706


# ---------------------------------------------------------------- warnings and reports


def test_stride_larger_than_the_kernel_warns():
    skip = analyze(stack_of([{"filters": 4, "stride": 4}, {"filters": 4}]), [32, 32, 1], 10)
    assert skip.warnings[0] == (
        "model.layers[0]: stride 4 is larger than the effective kernel 3, so input pixels "
        "between windows are never seen; use a stride no larger than the kernel, or a larger "
        "kernel or dilation"
    )
    fine = analyze(stack_of([{"filters": 4, "stride": 3}, {"filters": 4}]), [16, 16, 1], 10)
    assert not [w for w in fine.warnings if "stride" in w]


def test_small_receptive_field_and_linear_stack_warn():
    a = analyze(stack_of([{"filters": 4}, {"filters": 4}], {"activation": None}), [32, 32, 1], 10)
    assert a.warnings == [
        "model.layers[1]: the receptive field of the last feature map is 5x5 pixels, it covers "
        "16% of the image (32x32); add layers, dilation, stride or pooling to see more context",
        "model.layers: activation is null on every layer, so the conv stack is linear (one "
        "convolution could replace it); set model.layer_defaults.activation: relu",
    ]
    assert analyze(stack_of([{"filters": 4}] * 2), [8, 8, 1], 10).warnings == []


@pytest.mark.parametrize(
    "name, shape",
    [
        ("simple_cnn", [8, 8, 1]),
        ("simple_cnn", [28, 28, 1]),
        ("lenet5", [28, 28, 1]),
        ("vgg_small", [32, 32, 3]),
        ("vgg_small", [28, 28, 1]),
        ("dilated", [32, 32, 3]),
        ("dilated", [28, 28, 1]),
        ("allconv", [32, 32, 3]),
    ],
)
def test_shipped_models_analyse_cleanly_on_their_datasets(name, shape):
    cfg = model_cfg(name)
    assert cfg.name == name
    a = analyze(resolve_stack(cfg), shape, 10)
    assert a.warnings == []
    assert a.receptive_field >= shape[0] // 2
    d = analysis_to_dict(a)
    assert d["param_count"] == sum(row["params"] for row in d["layers"]) == a.param_count
    assert d["layers"][-1]["name"] == "classifier"
    table = format_table(a)
    assert f"params {a.param_count:,}" in table
    assert all(row.name in table for row in a.layers)


def test_a_receptive_field_far_larger_than_the_image_is_a_warning():
    """dilated is meant for 28x28 and larger: on 8x8 digits its 35-pixel field sees padding."""
    a = analyze(resolve_stack(model_cfg("dilated")), [8, 8, 1], 10)
    assert a.warnings == [
        "model.layers[5]: the receptive field of the last feature map is 35x35 pixels, 4.4 "
        "times the image (8x8): the extra depth mostly sees padding; fewer downsampling layers "
        "or a larger input would use it"
    ]
    assert analyze(resolve_stack(model_cfg("simple_cnn")), [8, 8, 1], 10).warnings == []  # 2x


def test_lenet5_refuses_8x8_digits():
    with pytest.raises(ConfigError, match=r"^model.layers\[1\]: the feature map shrinks"):
        analyze(resolve_stack(model_cfg("lenet5")), [8, 8, 1], 10)
