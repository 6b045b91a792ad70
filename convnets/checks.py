"""The whole training config checked in pure Python: before TensorFlow loads, before a run.

``train.py`` calls :func:`check_config` first thing in its task, so a mistake that can be seen
without the data costs about a second and leaves nothing behind (no store file, no run).
The job calls it again on the config it trains (a sweep point, a reproduced run's recorded
config), where a failure is recorded as usual.

Hydra already refuses a misspelt key, a value of the wrong type and a value outside an Enum
(``optimizer.name``, ``trainer.precision``...). Two things get through it:

- values of the right type but impossible (``trainer.epochs=0``, ``optimizer.lr=-0.01``);
- keys appended with ``+``: Hydra applies ``+key=value`` with ``OmegaConf.update(...,
  force_add=True)``, which lifts the struct flag along the key's path, so the key is added
  even to a dataclass-typed node (``+trainer.epoch=3`` would silently train the default
  epochs and log ``trainer.epoch`` as a param). :func:`unknown_keys` walks the config against
  the dataclasses of :mod:`convnets.config` to close the schema again.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from convnets.architecture import check_stack
from convnets.config import RUN_ID_KEYS
from convnets.errors import ConfigError
from convnets.memory_limit import MemoryLimit, memory_limit

_Rule = tuple[str, Callable[[Any], bool], str]


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: math.isfinite(v) and v >= low


def _in_unit(*, closed: bool) -> Callable[[Any], bool]:
    return lambda v: 0 <= v <= 1 if closed else 0 <= v < 1


def _positive(v: Any) -> bool:
    return math.isfinite(v) and v > 0


# (key, test, what the value must be). Keys typed as Enums are checked by Hydra already.
RULES: tuple[_Rule, ...] = (
    ("trainer.epochs", _at_least(1), "must be at least 1"),
    ("trainer.batch_size", _at_least(1), "must be at least 1"),
    ("trainer.steps_per_execution", _at_least(1), "must be at least 1"),
    ("trainer.seed", _at_least(0), "must be >= 0"),
    ("trainer.label_smoothing", _in_unit(closed=False), "must be in [0, 1)"),
    ("trainer.verbose", lambda v: v in (0, 1, 2), "must be 0, 1 or 2"),
    ("optimizer.lr", _positive, "must be > 0"),
    ("optimizer.weight_decay", _at_least(0), "must be >= 0"),
    ("optimizer.momentum", _in_unit(closed=False), "must be in [0, 1)"),
    ("optimizer.beta_1", _in_unit(closed=False), "must be in [0, 1)"),
    ("optimizer.beta_2", _in_unit(closed=False), "must be in [0, 1)"),
    ("optimizer.warmup_epochs", _at_least(0), "must be >= 0"),
    ("optimizer.min_lr_fraction", _in_unit(closed=True), "must be in [0, 1]"),
    ("optimizer.clipnorm", lambda v: v is None or _positive(v), "must be > 0 or null"),
    ("distribute.cpu_replicas", _at_least(0), "must be >= 0 (0 = off)"),
    ("dataset.val_fraction", _in_unit(closed=False), "must be in [0, 1)"),
    ("dataset.test_fraction", _in_unit(closed=False), "must be in [0, 1)"),
    ("dataset.max_pixel_value", _positive, "must be > 0"),
    ("dataset.mean", lambda v: all(math.isfinite(x) for x in v), "must be a number per channel"),
    ("dataset.std", lambda v: all(_positive(x) for x in v), "must be > 0 for every channel"),
    ("dataset.shuffle_buffer", _at_least(1), "must be at least 1"),
    ("dataset.augment.random_crop_padding", _at_least(0), "must be >= 0"),
    (
        "dataset.image_size",
        lambda v: v is None or (len(v) == 2 and min(v) >= 1),
        "must be [H, W] with positive sides, or null",
    ),
    ("tracking.http_timeout_s", _positive, "must be > 0"),
    ("tracking.outage_wait_s", _at_least(0), "must be >= 0"),
    (
        "tracking.uri",
        lambda v: bool(v and str(v).strip()),
        "is empty: give a store, e.g. sqlite:///mlflow.db (the default) or http://host:5000",
    ),
    ("trainer.freeze_layers", _at_least(0), "must be >= 0"),
)


def check_interpolations(cfg: DictConfig) -> None:
    """Every ``${...}`` in the config resolves: one that does not (an unset ``${oc.env:NAME}``,
    a key that is not there) is one line naming the key, not OmegaConf's traceback from
    wherever the value is first read."""
    try:
        for key in cfg:
            if key == "hydra":  # Hydra's own node (the API composes with it): Hydra's to resolve
                continue
            value = cfg[key]  # a plain value resolves here, a section below
            if OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)
    except MissingMandatoryValue as err:  # e.g. a ~dataset override removed a whole group
        raise ConfigError(
            f"{err.full_key or 'config'}: has no value (did an override remove it with "
            f"~{err.full_key}?); give it one, e.g. {err.full_key}=<option>"
        ) from None
    except InterpolationResolutionError as err:
        cause = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(err).splitlines()[0])
        raise ConfigError(
            f"{err.full_key or 'config'}: its ${{...}} cannot be resolved ({cause.strip(chr(34))}); "
            "set what it refers to (an environment variable, a key of the config), or give "
            "an environment variable a default: ${oc.env:NAME,default}"
        ) from None


def check_config(cfg: DictConfig) -> None:
    """Raise the :class:`ConfigError` of the first mistake in a training config; pure Python."""
    check_interpolations(cfg)
    check_known_keys(cfg)
    for key in RUN_ID_KEYS:
        if cfg.get(key) == "":  # an unset shell variable: resume=$RUN_ID
            raise ConfigError(
                f"{key}= is empty: give a run id ({key}=<run id>), or leave {key} out to train "
                "a new run"
            )
    _check_rules(cfg, RULES)
    _check_resize(cfg.dataset)
    if cfg.optimizer.warmup_epochs >= cfg.trainer.epochs:
        raise ConfigError(
            f"optimizer.warmup_epochs={cfg.optimizer.warmup_epochs} must be shorter than "
            f"trainer.epochs={cfg.trainer.epochs}"
        )
    if cfg.trainer.freeze_layers and not cfg.get("init_from"):
        raise ConfigError(
            f"trainer.freeze_layers={cfg.trainer.freeze_layers} freezes layers loaded from "
            "a pretrained run: add init_from=<run id>"
        )
    if cfg.dataset.source == "sklearn" and cfg.dataset.test_fraction == 0:
        raise ConfigError("dataset.test_fraction=0 leaves digits no test split: use e.g. 0.2")
    if cfg.dataset.input_shape is not None:  # known without the data: digits, TFDS sets
        check_channel_stats(cfg.dataset, int(cfg.dataset.input_shape[-1]))
    if cfg.distribute.cpu_replicas and cfg.distribute.strategy != "mirrored":
        raise ConfigError(
            f"distribute.cpu_replicas={cfg.distribute.cpu_replicas} splits the CPU for "
            f"distribute=mirrored, and this run uses distribute={cfg.distribute.strategy}: add "
            "distribute=mirrored, or leave cpu_replicas out"
        )
    replicas, which = _replicas_from_config(cfg.distribute)
    if replicas:
        check_replicas(cfg.trainer, replicas, which)
    on_cpus = cfg.distribute.cpu_replicas or any(
        "cpu" in str(d).lower() for d in cfg.distribute.devices or []
    )
    if replicas > 1 and on_cpus and cfg.trainer.jit_compile:
        raise ConfigError(
            f"trainer.jit_compile=true with several CPU replicas ({which}): XLA cannot reach a "
            "variable of one logical CPU device from another; set trainer.jit_compile=false, or "
            "train on one device"
        )
    check_stack(cfg.model, cfg.dataset)


def check_channel_stats(dataset: DictConfig, channels: int) -> None:
    """``dataset.mean`` / ``dataset.std``: one value, or one per channel of the images."""
    for key in ("mean", "std"):
        count = len(dataset[key])
        if count not in (1, channels):
            raise ConfigError(
                f"dataset.{key} has {count} values but the {dataset.name} images have "
                f"{channels} channel{'s' if channels > 1 else ''}: give one value or one per "
                "channel"
            )


def check_replicas(trainer: DictConfig, replicas: int, which: str) -> None:
    """What several replicas need of the trainer: a batch that splits evenly over them, and
    one step per execution (Keras 3's multi-step loop under a MirroredStrategy fails in
    TensorFlow 2.21 with "You must feed a value for placeholder tensor")."""
    check_batch_split(trainer.batch_size, replicas, which)
    if replicas > 1 and trainer.steps_per_execution > 1:
        raise ConfigError(
            f"trainer.steps_per_execution={trainer.steps_per_execution} with {replicas} "
            f"replicas ({which}): TensorFlow runs several steps per call on one device only; "
            "set trainer.steps_per_execution=1"
        )


def check_batch_split(batch_size: int, replicas: int, which: str) -> None:
    """The global batch must split evenly over the replicas (Keras gives each an equal share;
    an uneven split fails deep in TensorFlow's all-reduce)."""
    if batch_size % replicas == 0:
        return
    lower = batch_size - batch_size % replicas
    options = f"{lower} or {lower + replicas}" if lower else str(replicas)
    raise ConfigError(
        f"trainer.batch_size={batch_size} (the global batch) does not split evenly over "
        f"{replicas} replicas ({which}): use a multiple of {replicas}, e.g. {options}"
    )


def _replicas_from_config(distribute: DictConfig) -> tuple[int, str]:
    """How many replicas the config alone fixes (0: known only once TensorFlow sees the
    devices), and the key that says so."""
    if distribute.strategy in ("mirrored", "one_device") and distribute.devices:
        return len(distribute.devices), f"distribute.devices has {len(distribute.devices)}"
    if distribute.strategy == "mirrored" and distribute.cpu_replicas:
        return distribute.cpu_replicas, f"distribute.cpu_replicas={distribute.cpu_replicas}"
    return 0, ""


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a key added past the schema with ``+key=...`` (see :func:`unknown_keys`)."""
    for key in unknown_keys(cfg):
        raise ConfigError(
            f"{key}: unknown key (not in the config schema); check the spelling "
            "(--cfg job prints every key)"
        )


def check_dataset(cfg: DictConfig) -> None:
    """The ``dataset.*`` rules alone, for a command that reads data without training
    (``evaluate.py checkpoint=... dataset=...``)."""
    _check_rules(cfg, [rule for rule in RULES if rule[0].startswith("dataset.")])
    _check_resize(cfg.dataset)


def _check_resize(dataset: DictConfig) -> None:
    """``dataset.image_size`` resizes an image folder's images; another dataset has its own
    size, and the key was ignored there."""
    if dataset.get("image_size") is not None and dataset.get("source") != "image_folder":
        raise ConfigError(
            f"dataset.image_size={_show(list(dataset.image_size))} resizes the images of an "
            f"image folder (dataset=image_folder); dataset={dataset.name} has a size of its "
            "own: drop it"
        )


def _check_rules(cfg: DictConfig, rules) -> None:
    for key, test, must in rules:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, ListConfig):
            value = list(value)
        if not test(value):
            raise ConfigError(f"{key}={_show(value)} {must}")


def unknown_keys(node: Any, path: str = "") -> Iterator[str]:
    """Dotted keys present in ``node`` but not in the dataclass schema of their parent."""
    if isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from unknown_keys(node._get_node(index), f"{path}.{index}")
        return
    if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
        return
    schema = OmegaConf.get_type(node)
    known = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in node:
        full = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known:
            yield full
        else:
            yield from unknown_keys(node._get_node(key), full)


def _show(value: Any) -> str:
    return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)


# Training keeps, per image, every layer's output for the backward pass and a gradient of the
# same size; the analysis lists conv and batch-norm outputs, the activation's is a third, and
# TensorFlow's kernels need scratch space beside them: 6 float32 copies of the analysed outputs.
# A rough, generous bound: it is meant to catch stacks off by orders of magnitude (a layer of
# 100,000 filters), not to predict the peak.
_ACTIVATION_COPIES = 6
_BYTES = 4  # float32
_PARAM_COPIES = 4  # weights, gradients, Adam's two moments
WARN_FRACTION = 0.5  # of the memory this process may use


def training_memory(analysis: Any, batch_size: int) -> int:
    """Estimated bytes one training step needs: the activations of a global batch (with the
    backward pass) and the parameters with their gradients and optimizer state."""
    per_image = sum(math.prod(row.output_shape) for row in analysis.layers)
    activations = per_image * batch_size * _ACTIVATION_COPIES * _BYTES
    return activations + analysis.param_count * _PARAM_COPIES * _BYTES


def check_memory(
    analysis: Any,
    batch_size: int,
    limit: MemoryLimit | None = None,
    train_images: int | None = None,
) -> str | None:
    """Refuse a stack whose training step cannot fit in the memory this process may use (one
    line with the estimate and the limit: the machine's memory, or a container's, a job's or
    ``ulimit -v``'s where smaller, see :mod:`convnets.memory_limit`); return a warning above
    :data:`WARN_FRACTION` of it. Host memory, not a GPU's: this runs before TensorFlow has
    seen any device. ``train_images``, where known: no batch holds more images than that."""
    if limit is None:
        limit = memory_limit()
    batch = batch_size if train_images is None else min(batch_size, train_images)
    need = training_memory(analysis, batch)
    of_batch = (
        f"a batch of {batch_size}"
        if batch == batch_size
        else f"a batch of all {batch} training images (trainer.batch_size={batch_size})"
    )
    shown = (
        f"~{need / 2**30:.1f} GiB for {of_batch} (activations with the "
        f"backward pass, parameters with gradients and optimizer state)"
    )
    if need > limit.bytes:
        raise ConfigError(
            f"model.layers: this stack needs {shown}, more than {limit.what}; lower "
            "trainer.batch_size, model.width or the filters"
        )
    if need > WARN_FRACTION * limit.bytes:
        return f"model.layers: this stack needs {shown}, over half of {limit.what}"
    return None
