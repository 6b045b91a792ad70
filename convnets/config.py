"""Structured configs: the typed schema behind every YAML file in ``configs/``.

Registered in Hydra's ConfigStore on import, so a misspelt key or a value of the wrong
type is refused while Hydra composes the config, before anything is built.

Fields that accept "an int or [h, w]" are typed ``Any`` because OmegaConf 2.3 has no
``Union`` support; :mod:`convnets.architecture` checks them and names the offending key.

A per-layer field left unset is ``???`` (OmegaConf's MISSING) and falls back to
``model.layer_defaults``; this keeps "not set" apart from an explicit ``null`` (e.g.
``activation: null`` for a linear layer, ``pool: null`` to turn off a default pool).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

# ---------------------------------------------------------------- fixed sets of choices
# ``StrEnum``: Hydra refuses any other value while composing and lists the valid ones; the
# members compare equal to their YAML spelling (``Optimizer.adam == "adam"``) and ``str()`` is
# that spelling, so the code downstream and the params logged to MLflow see plain strings.


class Optimizer(StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"
    one_cycle = "one_cycle"


class Precision(StrEnum):
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


class Strategy(StrEnum):
    auto = "auto"
    mirrored = "mirrored"
    multi_worker = "multi_worker"
    one_device = "one_device"


class Source(StrEnum):
    sklearn = "sklearn"
    tfds = "tfds"
    image_folder = "image_folder"


# ---------------------------------------------------------------- what is trained, where it runs

# The runtime: keys that say where the data lives, which devices train and where the record
# goes, not what is trained (the TensorFlow Model Garden's ``runtime`` section, kept as key
# paths so the user-facing keys stay where they are). ``reproduce=``/``resume=`` accept
# overrides of these only (applied over the recorded config and tagged ``runtime_overrides``),
# and the config digest that ties a checkpoint to its run leaves them out.
RUNTIME_KEYS = (
    "checkpoint_dir",
    "dataset.data_dir",
    "dataset.path",
    "distribute",
    "trainer.verbose",
    "tracking",
)


# The keys whose value is an MLflow run id to look up before anything is trained.
RUN_ID_KEYS = ("reproduce", "resume", "init_from")


def override_key(override: str) -> str:
    """The key an override sets (``+dataset.path=x`` -> ``dataset.path``)."""
    return override.split("=", 1)[0].lstrip("+~")


def override_texts(overrides: ListConfig | list[str]) -> tuple[str, ...]:
    """Hydra's ``overrides.task`` as the text typed: not resolved, so an override whose value
    holds ``${...}`` (``'x=${oc.env:NAME}'``) is read as written, not resolved in Hydra's node
    (where it fails, or means something else)."""
    if isinstance(overrides, ListConfig):
        return tuple(OmegaConf.to_container(overrides, resolve=False))
    return tuple(overrides)


def read_run_config(
    path: str | Path,
    what: str,
    require: tuple[str, ...] = (),
    *,
    shown: str | None = None,
    then: str | None = None,
) -> DictConfig:
    """A run's resolved ``config.yaml`` (its artifact, or the copy beside a ``.keras`` model),
    or a :class:`ConfigError` naming ``what`` and the file when it is not one: not YAML, not
    a mapping, or without a section of ``require`` (``dataset``, to evaluate a model).
    ``shown``: how the message names the file (default its path: a downloaded artifact's is a
    temporary copy); ``then``: what the message says after what is wrong, instead of how to
    replace the file."""
    import yaml

    from convnets.errors import ConfigError

    def refused(wrong: str, advice: str) -> ConfigError:
        return ConfigError(f"{what}: {shown or path} {wrong}" + (f", {then}" if then else advice))

    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as err:
        where = (
            f" at line {err.problem_mark.line + 1}" if getattr(err, "problem_mark", None) else ""
        )
        raise refused(
            f"is not readable YAML{where}",
            "; it is not the config.yaml a run records (download the run's again, or write it "
            "as the run recorded it)",
        ) from None
    missing = [key for key in require if key not in cfg] if isinstance(cfg, DictConfig) else []
    if not isinstance(cfg, DictConfig) or missing:
        lacks = f"it has no {missing[0]} section" if missing else "it is not a mapping"
        raise refused(
            f"is not a run's config ({lacks})",
            "; download the run's config.yaml again, or write it as the run recorded it",
        )
    return cfg


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"layers": [{"filters": 8}]}}`` -> ``{"model.layers.0.filters": 8}``."""
    flat: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping | list | tuple) and len(value) > 0:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def is_runtime_key(key: str) -> bool:
    """``distribute.devices`` -> True (under ``distribute``); ``trainer.epochs`` -> False."""
    return any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)


# ---------------------------------------------------------------- model


@dataclass
class LayerDefaults:
    kernel_size: Any = 3  # int or [kh, kw]
    stride: Any = 1  # int or [sh, sw]
    padding: Any = "same"  # same | valid | int (zeros on each side)
    dilation: Any = 1  # int or [dh, dw]
    activation: str | None = "relu"  # any Keras activation name; null = linear
    batch_norm: bool = True  # Conv2D(no bias) -> BatchNormalization -> activation
    dropout: float = 0.0  # after the activation
    pool: str | None = None  # null | max | avg, after dropout
    pool_size: Any = 2  # int or [ph, pw]
    pool_stride: Any = None  # null = pool_size


@dataclass
class LayerConfig:
    """One Conv2D layer; every field but ``filters`` falls back to ``layer_defaults``."""

    filters: int = MISSING
    kernel_size: Any = MISSING
    stride: Any = MISSING
    padding: Any = MISSING
    dilation: Any = MISSING
    activation: Any = MISSING  # str or null
    batch_norm: Any = MISSING  # bool
    dropout: Any = MISSING  # float
    pool: Any = MISSING  # str or null
    pool_size: Any = MISSING
    pool_stride: Any = MISSING


@dataclass
class HeadConfig:
    global_pool: str = "avg"  # avg | max | flatten
    dropout: float = 0.0
    dense: list[int] = field(default_factory=list)  # hidden Dense widths before the classifier


@dataclass
class ModelConfig:
    name: str = MISSING
    width: float = 1.0  # multiplies every layer's filters (rounded, at least 1)
    layer_defaults: LayerDefaults = field(default_factory=LayerDefaults)
    layers: list[LayerConfig] = field(default_factory=list)
    head: HeadConfig = field(default_factory=HeadConfig)


# ---------------------------------------------------------------- data


@dataclass
class AugmentConfig:
    random_crop_padding: int = 0  # pad by N then crop back to the input size; 0 = off
    horizontal_flip: bool = False


@dataclass
class DatasetConfig:
    name: str = MISSING  # digits | mnist | fashion_mnist | cifar10 | cifar100 | image_folder
    source: Source = MISSING
    tfds_name: str | None = None  # the TFDS builder name, for source=tfds
    input_shape: list[int] | None = None  # [H, W, C]; null = taken from the images
    num_classes: int | None = None  # null = taken from the data (image_folder)
    data_dir: str | None = None  # TFDS data directory; null = TFDS_DATA_DIR or TFDS's default
    download: bool = True  # TFDS: download when not prepared and the host answers; false = never
    path: str | None = None  # image_folder root: <path>/<split>/<label>/<file>
    image_size: list[int] | None = None  # image_folder: resize to [H, W]
    val_fraction: float = 0.1  # carved from train; 0 = no validation
    split_seed: int = 0  # fixes which examples go to val (and digits' train/test split)
    test_fraction: float = 0.2  # digits only: it has no test split of its own
    max_pixel_value: float = 255.0  # the largest raw pixel value; pixels are divided by it first
    mean: list[float] = field(default_factory=lambda: [0.0])  # per channel, after that division
    std: list[float] = field(default_factory=lambda: [1.0])
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 10_000


# ---------------------------------------------------------------- optimisation


@dataclass
class OptimizerConfig:
    name: Optimizer = Optimizer.adam
    lr: float = 1e-3
    # Decoupled weight decay (Loshchilov & Hutter) for every optimizer: Keras 3 applies
    # ``weight_decay`` to the weights directly, not through the loss, so adam with
    # weight_decay > 0 is AdamW and sgd's is decoupled too.
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    beta_1: float = 0.9
    beta_2: float = 0.999
    schedule: Schedule = Schedule.constant
    warmup_epochs: float = 0.0  # linear warm-up from 0 before the schedule
    min_lr_fraction: float = 0.0  # cosine / one_cycle floor, as a fraction of lr
    clipnorm: float | None = None
    scale_lr_with_replicas: bool = False  # linear scaling rule: lr * num_replicas


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64  # global: split over replicas
    seed: int = 0
    deterministic: bool = False  # op determinism + seeded everything: bit-identical reruns
    precision: Precision = Precision.float32
    jit_compile: bool = False  # XLA
    steps_per_execution: int = 1
    label_smoothing: float = 0.0
    verbose: int = 1  # 0 quiet, 1 progress bar, 2 one line per epoch
    checkpoint_every_epoch: bool = True
    restore_best: bool = True  # test/log the best epoch: min val_loss (ties: val_accuracy)
    freeze_layers: int = 0  # with init_from: keep the first N loaded conv layers fixed


@dataclass
class DistributeConfig:
    strategy: Strategy = Strategy.auto
    devices: list[str] | None = None  # mirrored / one_device: e.g. ["/gpu:0", "/gpu:1"]
    cpu_replicas: int = 0  # mirrored on CPU: split the CPU into N logical devices
    sync_batch_norm: bool = False  # batch statistics over all replicas


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # the MLflow experiment; null = the dataset's name
    # null = model, dataset and the overrides that differ (in a sweep: jNN/tNN and the swept
    # values), at most 60 characters; the full overrides are tags
    run_name: str | None = None
    log_model: bool = True
    http_timeout_s: float = 10.0  # bound on MLflow's HTTP retries for a remote store
    # how long the end of a run waits for a store that stopped answering during it to take the
    # epochs it kept; past that they go to the run's folder (unsent_metrics.jsonl)
    outage_wait_s: float = 120.0


# ---------------------------------------------------------------- entry points


@dataclass
class TrainConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    distribute: DistributeConfig = MISSING
    tracking: TrackingConfig = MISSING
    reproduce: str | None = None  # MLflow run id to rerun exactly
    resume: str | None = None  # MLflow run id to continue from its last completed epoch
    # With resume=: the run's checkpoint folder when it was copied (another machine); default
    # the folder the run wrote, its checkpoint_dir tag.
    checkpoint_dir: str | None = None
    init_from: str | None = None  # MLflow run id whose logged model's weights start this run


@dataclass
class EvaluateConfig:
    tracking: TrackingConfig = MISSING
    run_id: str | None = None
    checkpoint: str | None = None  # a local .keras model instead of a run
    compare: str | None = None  # experiment name or sweep parent run id
    # with compare=: a run id or group label; every seed group is tested against its group
    baseline: str | None = None
    output_dir: str | None = None  # where figures / the report go; null = Hydra's run dir
    batch_size: int | None = None  # null = the run's trainer.batch_size (same batches as test_*)
    # checkpoint=<path.keras> without a config.yaml beside it: dataset=<name> says which data
    dataset: DatasetConfig | None = None


@dataclass
class InspectConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    input_shape: list[int] | None = None  # [H, W, C]; null = the dataset's
    num_classes: int | None = None  # null = the dataset's
    format: str = "table"  # table | json


def value_kind(key: str) -> str | None:
    """What ``key`` (dotted, ``model.layers.0.filters``) holds in the schema of a command:
    ``"list"``, ``"text"`` (a string), ``"value"`` (a number, a bool, a choice), or None
    where it may hold either or is no key of a schema. What a refused ``key=a,b`` is told
    to write instead."""
    import dataclasses
    import types
    import typing

    def options(node: Any) -> tuple:  # the types an Optional or a union allows
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            return tuple(t for t in typing.get_args(node) if t is not type(None))
        return (node,)

    def field_type(node: Any, parts: list[str]) -> Any:
        for part in parts:
            allowed = options(node)
            node = allowed[0] if len(allowed) == 1 else None  # a union: no single field
            if typing.get_origin(node) is list and part.isdigit():
                node = typing.get_args(node)[0]
            elif dataclasses.is_dataclass(node) and part in (hints := typing.get_type_hints(node)):
                node = hints[part]
            else:
                return None
        return node

    for schema in (TrainConfig, EvaluateConfig, InspectConfig):
        node = field_type(schema, key.split("."))
        if node is None:
            continue
        kinds = {
            "list" if typing.get_origin(t) is list else "text" if t is str else "value"
            for t in options(node)
            if t is not Any
        }
        return kinds.pop() if len(kinds) == 1 and Any not in options(node) else None
    return None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="inspect_schema", node=InspectConfig)


register_configs()
