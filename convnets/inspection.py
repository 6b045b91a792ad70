"""What ``python -m convnets.inspect model=<name> [input_shape=[H,W,C]] [num_classes=N]
[format=json]`` does with its config (the command: :func:`convnets.commands.inspect`).

Prints the per-layer table (output shape, params, MACs, receptive field, jump, start) of a
model config without building or training anything; warnings go to stderr as
``warning: ...`` lines. ``format=json`` prints exactly one JSON object on stdout instead.
Input shape and classes come from the dataset config unless given. Pure Python: this never
imports TensorFlow, so it answers in about a second.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from convnets.architecture import (
    Analysis,
    Stack,
    analysis_to_dict,
    analyze,
    format_table,
    resolve_stack,
)
from convnets.checks import check_interpolations
from convnets.errors import ConfigError, warn

FORMATS = ("table", "json")


def _from_dataset(cfg: DictConfig, key: str, folder: Callable[[], tuple]):
    """``cfg.<key>`` if given, else the dataset config's, else an image folder's (``folder()``:
    its shape and classes), else a ConfigError saying what to pass."""
    value = cfg.get(key)
    if value is None and not OmegaConf.is_missing(cfg, "dataset"):
        value = cfg.dataset.get(key)
        if value is None and cfg.dataset.get("source") == "image_folder" and cfg.dataset.path:
            shape, classes = folder()
            value = list(shape) if key == "input_shape" else classes
    if value is None:
        example = "input_shape=[28,28,1]" if key == "input_shape" else "num_classes=10"
        raise ConfigError(
            f"{key}: the dataset config does not fix it (it comes from the images); "
            f"pass it, e.g. {example}"
        )
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def input_shape_and_classes(cfg: DictConfig) -> tuple:
    """The input shape and class count to analyse with: given, else the dataset config's,
    else an image folder's as training reads them (read once for both)."""

    @functools.cache
    def folder() -> tuple:
        from convnets.data import dataset_shape  # no TensorFlow: a header and folder names

        return dataset_shape(cfg.dataset)

    return _from_dataset(cfg, "input_shape", folder), _from_dataset(cfg, "num_classes", folder)


def analysis_of(cfg: DictConfig) -> tuple[Stack, Analysis]:
    """``(stack, analysis)`` of ``cfg.model`` on its input, every key checked first."""
    check_interpolations(cfg)
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be table or json, got {cfg.format!r}")
    stack = resolve_stack(cfg.model)
    return stack, analyze(stack, *input_shape_and_classes(cfg))


def run(cfg: DictConfig) -> dict:
    """Analyse ``cfg.model`` and print the table or the JSON object; return the JSON dict."""
    stack, analysis = analysis_of(cfg)
    result = analysis_to_dict(analysis)
    if cfg.format == "json":
        print(json.dumps(result), flush=True)
    else:
        print(f"model {stack.name}", flush=True)
        print(format_table(analysis), flush=True)
        for warning in analysis.warnings:
            warn(warning)
    return result
