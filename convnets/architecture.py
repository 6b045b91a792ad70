"""Pure architecture analysis of a Conv2D stack: validation, shapes, params, MACs, receptive field.

No TensorFlow here (a test checks it): the numbers are computed from the config alone, so
``python -m convnets.inspect`` answers in a second and the trainer can refuse a bad stack
before it builds anything. :mod:`convnets.model` builds the Keras model from the same
:class:`Stack`, and the tests check that both agree (params and shapes per layer).

Receptive field, jump and start follow the standard recurrence (Araujo, Norris & Sim,
"Computing Receptive Fields of Convolutional Neural Networks", Distill 2019), per axis::

    k_eff = d * (k - 1) + 1
    r_out = r_in + (k_eff - 1) * j_in
    j_out = j_in * s
    start_out = start_in + ((k_eff - 1) / 2 - pad_before) * j_in

``start`` is the centre of the first output unit in input-pixel coordinates (pixel 0 has
its centre at 0). Pooling is a layer like any other. ``pad_before`` is the explicit int
padding, 0 for ``valid``, and for ``same`` what TensorFlow pads before: half of the total
padding, rounded down (the odd pixel goes after).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from convnets.config import HeadConfig, LayerDefaults
from convnets.errors import ConfigError

# Keras 3 activation names (keras.activations) that keep the tensor's shape. "glu" is left
# out on purpose: it halves the channels. A test checks every name against Keras, so the
# list cannot drift silently; it is static because this module must not import Keras.
ACTIVATIONS = frozenset(
    {
        "celu",
        "elu",
        "exponential",
        "gelu",
        "hard_shrink",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "hard_tanh",
        "leaky_relu",
        "linear",
        "log_sigmoid",
        "log_softmax",
        "mish",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "soft_shrink",
        "softmax",
        "softplus",
        "softsign",
        "sparse_plus",
        "sparse_sigmoid",
        "sparsemax",
        "squareplus",
        "swish",
        "tanh",
        "tanh_shrink",
        "threshold",
    }
)
PADDINGS = ("same", "valid")
POOLS = ("max", "avg")
GLOBAL_POOLS = ("avg", "max", "flatten")

# The schema's defaults (convnets/config.py), for plain dicts that leave fields out. Derived
# from the dataclasses, so the CLI, the notebooks and plain dicts always build the same stack.
_LAYER_DEFAULTS: dict[str, Any] = dataclasses.asdict(LayerDefaults())
_HEAD_DEFAULTS: dict[str, Any] = dataclasses.asdict(HeadConfig())
_MISSING = "???"  # OmegaConf's MISSING, as to_container(throw_on_missing=False) leaves it

Pair = tuple[int, int]


# ---------------------------------------------------------------- resolved stack


@dataclass(frozen=True)
class ConvLayer:
    """One resolved Conv2D block; every field known. ``index`` is the config index (0-based)."""

    index: int
    filters: int  # already multiplied by the model's width (rounded, >= 1)
    kernel_size: Pair
    stride: Pair
    padding: str | int  # "same" | "valid" | zeros on each side
    dilation: Pair
    activation: str | None
    batch_norm: bool
    dropout: float
    pool: str | None
    pool_size: Pair
    pool_stride: Pair

    @property
    def effective_kernel(self) -> Pair:
        return _effective_kernel(self.kernel_size, self.dilation)


@dataclass(frozen=True)
class Head:
    global_pool: str
    dropout: float
    dense: tuple[int, ...]


@dataclass(frozen=True)
class Stack:
    name: str
    layers: tuple[ConvLayer, ...]
    head: Head


def _container(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), throw_on_missing=False)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"model: expected a mapping of the model schema, got {type(cfg).__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(value: Any, where: str, key: str, minimum: int = 1) -> Pair:
    """An int or [h, w] of ints >= ``minimum`` as an (h, w) tuple."""
    if _is_int(value):
        value = [value, value]
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        if min(value) >= minimum:
            return (value[0], value[1])
        raise ConfigError(
            f"{where}: {key} must be positive, got {_show(value)}; use e.g. {key}: 3 or [3, 5]"
        )
    raise ConfigError(
        f"{where}: {key} must be a positive int or [h, w], got {_show(value)}; "
        f"use e.g. {key}: 3 or [3, 5]"
    )


def _show(value: Any) -> str:
    if isinstance(value, tuple | list) and len(value) == 2 and value[0] == value[1]:
        return str(value[0]) if _is_int(value[0]) else repr(list(value))
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _fraction(value: Any, where: str, key: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1:
        return float(value)
    raise ConfigError(f"{where}: {key} must be a number in [0, 1), got {value!r}")


def _effective_kernel(kernel: Pair, dilation: Pair) -> Pair:
    return (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)


def _resolve_layer(i: int, raw: Any, defaults: dict[str, Any], width: float) -> ConvLayer:
    here = f"model.layers[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{here}: expected a mapping like {{filters: 32}}, got {raw!r}")
    unknown = sorted(set(raw) - {"filters", *_LAYER_DEFAULTS})
    if unknown:
        raise ConfigError(
            f"{here}: unknown key {unknown[0]!r}; known keys: filters, {', '.join(_LAYER_DEFAULTS)}"
        )

    def get(key: str) -> tuple[Any, str]:
        value = raw.get(key, _MISSING)
        if value == _MISSING:
            return defaults[key], "model.layer_defaults"
        return value, here

    filters = raw.get("filters", _MISSING)
    if filters == _MISSING:
        raise ConfigError(f"{here}: filters is required; add e.g. {{filters: 32}}")
    if not _is_int(filters) or filters < 1:
        raise ConfigError(f"{here}: filters must be a positive int, got {filters!r}")

    kernel = _pair(*get("kernel_size"), "kernel_size")
    stride = _pair(*get("stride"), "stride")
    dilation = _pair(*get("dilation"), "dilation")

    padding, where = get("padding")
    if not (padding in PADDINGS or (_is_int(padding) and padding >= 0)):
        raise ConfigError(
            f"{where}: padding must be same, valid or an int >= 0 (zeros on each side), "
            f"got {padding!r}"
        )

    activation, where = get("activation")
    if activation is not None and activation not in ACTIVATIONS:
        raise ConfigError(
            f"{where}: unknown activation {activation!r}; use a Keras activation name "
            "(relu, gelu, silu, tanh, elu, leaky_relu, ...) or null for linear"
        )

    batch_norm, where = get("batch_norm")
    if not isinstance(batch_norm, bool):
        raise ConfigError(f"{where}: batch_norm must be true or false, got {batch_norm!r}")

    dropout = _fraction(*get("dropout"), "dropout")

    pool, where = get("pool")
    if pool is not None and pool not in POOLS:
        raise ConfigError(f"{where}: pool must be max, avg or null, got {pool!r}")
    pool_size = _pair(*get("pool_size"), "pool_size")
    pool_stride_raw, where = get("pool_stride")
    pool_stride = (
        pool_size if pool_stride_raw is None else _pair(pool_stride_raw, where, "pool_stride")
    )

    # Keras refuses this combination (Conv2D: strides > 1 with dilation_rate > 1).
    if max(stride) > 1 and max(dilation) > 1:
        raise ConfigError(
            f"{here}: stride {_show(stride)} with dilation {_show(dilation)} is not supported "
            "(Keras refuses stride > 1 together with dilation > 1); set stride: 1 or dilation: 1"
        )
    return ConvLayer(
        index=i,
        filters=max(1, math.floor(filters * width + 0.5)),  # round half up, at least 1
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        activation=activation,
        batch_norm=batch_norm,
        dropout=dropout,
        pool=pool,
        pool_size=pool_size,
        pool_stride=pool_stride,
    )


def _resolve_head(raw: Any) -> Head:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model.head: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(_HEAD_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"model.head: unknown key {unknown[0]!r}; known keys: {', '.join(_HEAD_DEFAULTS)}"
        )
    head = {**_HEAD_DEFAULTS, **raw}
    if head["global_pool"] not in GLOBAL_POOLS:
        raise ConfigError(
            f"model.head: global_pool must be avg, max or flatten, got {head['global_pool']!r}"
        )
    dense = head["dense"] if head["dense"] is not None else []
    if isinstance(dense, str) or not all(_is_int(u) and u >= 1 for u in dense):
        raise ConfigError(
            f"model.head: dense must be a list of positive widths (e.g. [128]), got {dense!r}"
        )
    return Head(
        global_pool=head["global_pool"],
        dropout=_fraction(head["dropout"], "model.head", "dropout"),
        dense=tuple(dense),
    )


def resolve_stack(model_cfg: Any) -> Stack:
    """Resolve a model config into a validated :class:`Stack`.

    ``model_cfg`` is a ``DictConfig`` of :class:`convnets.config.ModelConfig`, that dataclass,
    or a plain dict (missing fields take the schema's defaults). Per-layer fields left unset
    (``???``) fall back to ``layer_defaults``. Raises :class:`ConfigError` naming the key
    (``model.layers[3]: ...`` or ``model.layer_defaults: ...``) and the fix.
    """
    cfg = _container(model_cfg)
    name = cfg.get("name", "model")
    name = "model" if name in (None, _MISSING) else str(name)

    width = cfg.get("width", 1.0)
    if (
        isinstance(width, bool)
        or not isinstance(width, int | float)
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ConfigError(
            f"model.width must be a positive number, got {width!r}: it scales every layer's "
            "filters (1 keeps them, 0.5 halves them)"
        )

    raw_defaults = cfg.get("layer_defaults") or {}
    unknown = sorted(set(raw_defaults) - set(_LAYER_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"model.layer_defaults: unknown key {unknown[0]!r}; "
            f"known keys: {', '.join(_LAYER_DEFAULTS)}"
        )
    defaults = {**_LAYER_DEFAULTS, **raw_defaults}

    raw_layers = cfg.get("layers")
    if not raw_layers or isinstance(raw_layers, str | Mapping):
        raise ConfigError(
            "model.layers: the stack has no Conv2D layers; declare at least one, "
            "e.g. model.layers=[{filters:32}]"
        )
    layers = tuple(_resolve_layer(i, raw, defaults, width) for i, raw in enumerate(raw_layers))
    return Stack(name=name, layers=layers, head=_resolve_head(cfg.get("head")))


# ---------------------------------------------------------------- analysis


@dataclass
class LayerInfo:
    """One row of the per-layer table, named like the Keras layer it describes.

    Spatial rows (conv, batch norm, pool) have ``output_shape`` (h, w, c) and the receptive
    field ``receptive_field`` (h, w), ``jump`` (h, w) and ``start`` (h, w) of their output
    units. Head rows (global pool / flatten, dense, classifier) have ``output_shape`` (n,)
    as Keras reports it, and ``None`` for the spatial fields. A conv row includes its
    explicit padding (the ``block{i}_pad`` ZeroPadding2D layer has no row of its own).
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    receptive_field: Pair | None = None
    jump: Pair | None = None
    start: tuple[float, float] | None = None
    config_index: int | None = None  # model.layers[i] this row belongs to


@dataclass
class Analysis:
    layers: list[LayerInfo]
    param_count: int
    macs: int
    receptive_field: int  # the larger side, last spatial feature map (before the head)
    receptive_field_hw: Pair
    feature_shape: tuple[int, int, int]  # the last spatial feature map, (h, w, c)
    input_shape: tuple[int, int, int]
    num_classes: int
    warnings: list[str] = field(default_factory=list)


def _same_pad_before(n: int, k_eff: int, s: int) -> int:
    """TensorFlow's ``same`` padding before the first pixel along one axis."""
    out = -(-n // s)
    return max((out - 1) * s + k_eff - n, 0) // 2


class _Field:
    """Receptive-field state along both axes, advanced one sliding-window layer at a time."""

    def __init__(self, h: int, w: int) -> None:
        self.size = [h, w]
        self.rf = [1, 1]
        self.jump = [1, 1]
        self.start = [0.0, 0.0]

    def step(self, k_eff: Pair, stride: Pair, padding: str | int) -> list[int]:
        """Advance by one window; return the (unclamped) output size per axis."""
        out = []
        for a in range(2):
            n, k, s = self.size[a], k_eff[a], stride[a]
            if padding == "same":
                size, before = -(-n // s), _same_pad_before(n, k, s)
            elif padding == "valid":
                size, before = (n - k) // s + 1, 0
            else:
                size, before = (n + 2 * padding - k) // s + 1, padding
            self.start[a] += ((k - 1) / 2 - before) * self.jump[a]
            self.rf[a] += (k - 1) * self.jump[a]
            self.jump[a] *= s
            out.append(size)
        self.size = out
        return out


def _kernel_text(layer: ConvLayer) -> str:
    text = f"kernel {_show(layer.kernel_size)}"
    if max(layer.dilation) > 1:
        text += f", dilation {_show(layer.dilation)}"
    if max(layer.stride) > 1:
        text += f", stride {_show(layer.stride)}"
    return f"{text}, padding {layer.padding}"


def check_stack(model_cfg: Any, dataset_cfg: Any) -> None:
    """Raise the :class:`ConfigError` of an invalid stack; silent when it is valid.

    For the entry points: pure Python, so a bad stack is refused in a second, before
    TensorFlow loads. The shape is checked only where the dataset config fixes it
    (``image_folder`` reads it from the images, later).
    """
    stack = resolve_stack(model_cfg)
    input_shape, num_classes = dataset_cfg.get("input_shape"), dataset_cfg.get("num_classes")
    if input_shape is not None and num_classes is not None:
        analyze(stack, list(input_shape), num_classes)


def parse_input_shape(input_shape: Any) -> tuple[int, int, int]:
    """``input_shape`` as an (H, W, C) tuple of positive ints, else a ConfigError."""
    shape = list(input_shape) if isinstance(input_shape, Sequence | tuple) else None
    if shape is None or len(shape) != 3 or not all(_is_int(v) and v >= 1 for v in shape):
        raise ConfigError(
            f"input_shape must be [H, W, C] of positive ints, got {input_shape!r}; "
            "e.g. input_shape=[28,28,1]"
        )
    return (shape[0], shape[1], shape[2])


def analyze(stack: Stack, input_shape: Any, num_classes: int) -> Analysis:
    """Per-layer shapes, params, MACs and receptive field of ``stack`` at ``input_shape``.

    Params count what Keras's ``count_params()`` counts: conv weights (+ bias only without
    batch norm), batch norm's 4 vectors (gamma, beta, moving mean and variance), dense and
    classifier weights and biases. MACs are multiply-accumulates per image, forward, of the
    conv, dense and classifier layers only; batch norm, activations, pooling, bias adds,
    padding and the softmax are not counted (they are small next to the convolutions).

    Raises :class:`ConfigError` naming the layer when a feature map shrinks to zero.
    """
    shape = parse_input_shape(input_shape)
    if not _is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    h, w, c = shape
    where = f"at input {h}x{w}x{c}"
    fld = _Field(h, w)
    rows: list[LayerInfo] = []
    warnings: list[str] = []

    def spatial(name: str, kind: str, ch: int, params: int, macs: int, i: int) -> None:
        rows.append(
            LayerInfo(
                name=name,
                kind=kind,
                output_shape=(fld.size[0], fld.size[1], ch),
                params=params,
                macs=macs,
                receptive_field=(fld.rf[0], fld.rf[1]),
                jump=(fld.jump[0], fld.jump[1]),
                start=(fld.start[0], fld.start[1]),
                config_index=i,
            )
        )

    for layer in stack.layers:
        i, block = layer.index, f"block{layer.index + 1}"
        k_eff = layer.effective_kernel
        if any(s > k for s, k in zip(layer.stride, k_eff, strict=True)):
            warnings.append(
                f"model.layers[{i}]: stride {_show(layer.stride)} is larger than the effective "
                f"kernel {_show(k_eff)}, so input pixels between windows are never seen; "
                "use a stride no larger than the kernel, or a larger kernel or dilation"
            )
        out = fld.step(k_eff, layer.stride, layer.padding)
        if min(out) < 1:
            raise ConfigError(
                f"model.layers[{i}]: the feature map shrinks to {max(out[0], 0)}x{max(out[1], 0)} "
                f"{where} ({_kernel_text(layer)}); use padding: same, a smaller kernel/stride, "
                "or fewer downsampling layers"
            )
        kh, kw = layer.kernel_size
        f = layer.filters
        spatial(
            f"{block}_conv",
            "conv",
            f,
            kh * kw * c * f + (0 if layer.batch_norm else f),
            out[0] * out[1] * kh * kw * c * f,
            i,
        )
        c = f
        if layer.batch_norm:
            spatial(f"{block}_bn", "batch_norm", c, 4 * c, 0, i)
        if layer.pool is not None:
            if any(s > k for s, k in zip(layer.pool_stride, layer.pool_size, strict=True)):
                warnings.append(
                    f"model.layers[{i}]: pool_stride {_show(layer.pool_stride)} is larger than "
                    f"pool_size {_show(layer.pool_size)}, so feature-map pixels are skipped; "
                    "use pool_stride: null (= pool_size)"
                )
            before = list(fld.size)
            out = fld.step(layer.pool_size, layer.pool_stride, "valid")
            if min(out) < 1:
                raise ConfigError(
                    f"model.layers[{i}]: the feature map shrinks to {max(out[0], 0)}x"
                    f"{max(out[1], 0)} {where} ({layer.pool} pool_size "
                    f"{_show(layer.pool_size)} on a {before[0]}x{before[1]} map); use a smaller "
                    "pool_size, pool: null, or fewer downsampling layers"
                )
            spatial(f"{block}_pool", f"{layer.pool}_pool", c, 0, 0, i)

    fh, fw = fld.size
    rf_hw = (fld.rf[0], fld.rf[1])
    last = stack.layers[-1].index
    cover = min(rf_hw[0] / h, rf_hw[1] / w)
    if cover < 0.5:
        warnings.append(
            f"model.layers[{last}]: the receptive field of the last feature map is "
            f"{rf_hw[0]}x{rf_hw[1]} pixels, it covers {cover:.0%} of the image ({h}x{w}); "
            "add layers, dilation, stride or pooling to see more context"
        )
    over = min(rf_hw[0] / h, rf_hw[1] / w)
    if over > 2:
        warnings.append(
            f"model.layers[{last}]: the receptive field of the last feature map is "
            f"{rf_hw[0]}x{rf_hw[1]} pixels, {over:.1f} times the image ({h}x{w}): the extra "
            "depth mostly sees padding; fewer downsampling layers or a larger input would use it"
        )
    if all(layer.activation is None for layer in stack.layers):
        warnings.append(
            "model.layers: activation is null on every layer, so the conv stack is linear "
            "(one convolution could replace it); set model.layer_defaults.activation: relu"
        )

    head = stack.head
    features = fh * fw * c if head.global_pool == "flatten" else c
    kind = "flatten" if head.global_pool == "flatten" else f"global_{head.global_pool}_pool"
    rows.append(LayerInfo("head_pool", kind, (features,), 0, 0))
    for j, units in enumerate(head.dense, start=1):
        rows.append(
            LayerInfo(f"dense{j}", "dense", (units,), features * units + units, features * units)
        )
        features = units
    rows.append(
        LayerInfo(
            "classifier",
            "classifier",
            (num_classes,),
            features * num_classes + num_classes,
            features * num_classes,
        )
    )
    return Analysis(
        layers=rows,
        param_count=sum(r.params for r in rows),
        macs=sum(r.macs for r in rows),
        receptive_field=max(rf_hw),
        receptive_field_hw=rf_hw,
        feature_shape=(fh, fw, c),
        input_shape=shape,
        num_classes=num_classes,
        warnings=warnings,
    )


# ---------------------------------------------------------------- reporting


def analysis_to_dict(a: Analysis) -> dict[str, Any]:
    """JSON-ready dict: totals, ``layers`` (one dict per row) and ``warnings``."""
    return {
        "param_count": a.param_count,
        "macs": a.macs,
        "receptive_field": a.receptive_field,
        "receptive_field_hw": list(a.receptive_field_hw),
        "feature_shape": list(a.feature_shape),
        "input_shape": list(a.input_shape),
        "num_classes": a.num_classes,
        "layers": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(r).items()}
            for r in a.layers
        ],
        "warnings": list(a.warnings),
    }


def _hw(pair: Sequence[float] | None) -> str:
    if pair is None:
        return ""
    if pair[0] == pair[1]:
        return f"{pair[0]:g}"
    return f"{pair[0]:g}x{pair[1]:g}"


def _macs(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_table(a: Analysis) -> str:
    """The per-layer table a researcher reads before training, with the totals under it."""
    header = ("layer", "kind", "output", "params", "MACs", "RF", "jump", "start")
    rows = [header, ("input", "input", "x".join(map(str, a.input_shape)), "", "", "1", "1", "0")]
    for r in a.layers:
        rows.append(
            (
                r.name,
                r.kind,
                "x".join(map(str, r.output_shape)),
                f"{r.params:,}",
                _macs(r.macs) if r.macs else "",
                _hw(r.receptive_field),
                _hw(r.jump),
                _hw(r.start),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    right = {3, 4, 5, 6, 7}  # numbers right-aligned

    def line(row: Sequence[str]) -> str:
        cells = (
            v.rjust(wd) if k in right else v.ljust(wd)
            for k, (v, wd) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    rf_h, rf_w = a.receptive_field_hw
    h, w, _ = a.input_shape
    lines = [line(header), rule, *(line(row) for row in rows[1:]), rule]
    lines.append(
        f"params {a.param_count:,}  |  MACs/image {_macs(a.macs)} ({a.macs:,})  |  "
        f"receptive field {rf_h}x{rf_w} of a {h}x{w} input  |  "
        f"features {'x'.join(map(str, a.feature_shape))}  |  classes {a.num_classes}"
    )
    return "\n".join(lines)
