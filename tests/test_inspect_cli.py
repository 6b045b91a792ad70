"""``python -m convnets.inspect`` through the real command line: the table, the JSON object,
and every validation error of the model schema as exactly one line with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convnets
from convnets.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def inspect(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "convnets.inspect", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_json_is_one_object_with_the_totals_and_layers():
    result = inspect("model=lenet5", "input_shape=[28,28,1]", "num_classes=10", "format=json")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.strip().splitlines()
    report = json.loads(line)
    # LeCun et al. 1998, "Gradient-based learning applied to document recognition": C1 output
    # 28x28x6 (the config pads MNIST's 28x28 to the paper's 32x32), C3 10x10x16, C5 1x1x120.
    shapes = {layer["name"]: layer["output_shape"] for layer in report["layers"]}
    assert shapes["block1_conv"] == [28, 28, 6]
    assert shapes["block2_conv"] == [10, 10, 16]
    assert shapes["block3_conv"] == [1, 1, 120]
    assert report["receptive_field"] == 32
    assert {"param_count", "receptive_field", "macs", "layers"} <= report.keys()
    assert report["param_count"] == sum(layer["params"] for layer in report["layers"])
    assert report["macs"] == sum(layer["macs"] for layer in report["layers"])


def test_table_is_what_a_researcher_reads_before_training():
    result = inspect("model=dilated")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("model dilated")
    for column in ("output", "params", "MACs", "RF"):
        assert column in out
    assert "Traceback" not in result.stderr


def test_input_shape_and_classes_come_from_the_dataset():
    digits = json.loads(inspect("format=json").stdout)
    cifar = json.loads(inspect("dataset=cifar10", "format=json").stdout)
    assert digits["input_shape"] == [8, 8, 1] and cifar["input_shape"] == [32, 32, 3]
    assert cifar["param_count"] > digits["param_count"]  # 3 input channels


def test_an_image_folder_gives_its_shape_and_classes_as_training_reads_them(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b", "c"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (12, 10)).save(tmp_path / split / label / "0.png")
    folder = ["dataset=image_folder", f"dataset.path={tmp_path}"]
    analysis = convnets.inspect(folder)
    assert analysis.input_shape == (10, 12, 3) and analysis.num_classes == 3
    assert convnets.inspect([*folder, "dataset.image_size=[16,16]"]).input_shape == (16, 16, 3)
    with pytest.raises(ConfigError, match=r"^input_shape: the dataset config does not fix it"):
        convnets.inspect(["dataset=image_folder"])  # no folder: nothing to read it from


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.layers.0.stride=2", "model.layers.0.dilation=2"],
         "model.layers[0]: stride 2 with dilation 2 is not supported (Keras refuses stride > 1 together with dilation > 1); set stride: 1 or dilation: 1"),
        (["model=lenet5"],
         "model.layers[1]: the feature map shrinks to 0x0 at input 8x8x1 (kernel 5, padding valid); use padding: same, a smaller kernel/stride, or fewer downsampling layers"),
        (["model.layers.1.stride=3"],
         "model.layers[3]: the feature map shrinks to 0x0 at input 8x8x1 (max pool_size 2 on a 1x1 map); use a smaller pool_size, pool: null, or fewer downsampling layers"),
        (["model.layers.0.filters=0"], "model.layers[0]: filters must be a positive int, got 0"),
        (["model.layers.1.kernel_size=[0,3]"],
         "model.layers[1]: kernel_size must be positive, got [0, 3]; use e.g. kernel_size: 3 or [3, 5]"),
        (["model.layers.0.padding=full"],
         "model.layers[0]: padding must be same, valid or an int >= 0 (zeros on each side), got 'full'"),
        (["model.layers.0.pool=median"],
         "model.layers[0]: pool must be max, avg or null, got 'median'"),
        (["model.layers.0.activation=rleu"],
         "model.layers[0]: unknown activation 'rleu'; use a Keras activation name (relu, gelu, silu, tanh, elu, leaky_relu, ...) or null for linear"),
        (["model.width=0"], "model.width must be a positive number, got 0.0: it scales every layer's filters (1 keeps them, 0.5 halves them)"),
        (["format=xml"], "format must be table or json, got 'xml'"),
    ],
)  # fmt: skip
def test_invalid_models_are_one_line_naming_the_layer_and_the_fix(overrides, message):
    result = inspect(*overrides)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert result.stdout == ""


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.layer_defaults.kernel_sise=3",
         "model.layer_defaults.kernel_sise: unknown key (Key 'kernel_sise' not in 'LayerDefaults'); check the spelling (--cfg job prints every key)"),
        ("model.layers.0.filtres=3",
         "model.layers[0].filtres: unknown key (Key 'filtres' not in 'LayerConfig'); check the spelling (--cfg job prints every key)"),
        ("model.width=wide", "model.width: Value 'wide' of type 'str' could not be converted to Float; give a number"),
        ("model=resnet", "Could not find 'model/resnet'; available: allconv, dilated, lenet5, simple_cnn, vgg_small"),
        ("input_shape=[8,8", "input_shape=[8,8: no viable alternative at input '[8,8'; check that its brackets, braces and quotes pair up (quote the whole override for the shell: 'key=[...]')"),
        ("input_shape=[8.5,8,1]",
         "input_shape[0]: Value '8.5' of type 'float' could not be converted to Integer; give a whole number"),
        ("input_shape=8", "input_shape: a single value where a list belongs; give input_shape=[...]"),
    ],
)  # fmt: skip
def test_schema_errors_from_hydra_are_one_line_too(override, message):
    """Misspelt keys and wrong types are refused by the structured config while Hydra composes,
    before anything runs; they read like every other user error. The first through the
    command (exit 2, the line on stderr), the others in this process (the same line)."""
    if override.startswith("model.layer_defaults"):
        result = inspect(override)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: {message}"]
    else:
        with pytest.raises(ConfigError) as refused:
            convnets.inspect([override])
        assert str(refused.value) == message


def test_pitfalls_warn_but_still_report():
    # kernel 3 with stride 4 skips input pixels; an all-linear stack is one linear map
    result = inspect(
        "model.layers.0.stride=4", "model.layer_defaults.activation=null", "input_shape=[64,64,1]"
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("model.layers[0]" in w and "stride 4" in w for w in warnings), warnings
    assert any("activation" in w for w in warnings), warnings
    assert result.stdout.startswith("model simple_cnn")
