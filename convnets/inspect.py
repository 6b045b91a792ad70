"""``python -m convnets.inspect model=<name> [input_shape=[H,W,C]] [num_classes=N] [format=json]``.

Prints the per-layer table (output shape, params, MACs, receptive field, jump, start) of a
model config without building or training anything; warnings go to stderr as
``warning: ...`` lines. ``format=json`` prints exactly one JSON object on stdout instead.
Input shape and classes come from the dataset config unless given. Pure Python: this never
imports TensorFlow, so it answers in about a second.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import convnets.config  # noqa: F401  (registers the schemas Hydra composes against)
from convnets.architecture import analysis_to_dict, analyze, format_table, resolve_stack
from convnets.cli import report_user_errors, run_main
from convnets.errors import ConfigError

FORMATS = ("table", "json")


def _from_dataset(cfg: DictConfig, key: str):
    """``cfg.<key>`` if given, else the dataset config's, else a ConfigError saying what to pass."""
    value = cfg.get(key)
    if value is None and not OmegaConf.is_missing(cfg, "dataset"):
        value = cfg.dataset.get(key)
    if value is None:
        example = "input_shape=[28,28,1]" if key == "input_shape" else "num_classes=10"
        raise ConfigError(
            f"{key}: the dataset config does not fix it (it comes from the images); "
            f"pass it, e.g. {example}"
        )
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def run(cfg: DictConfig) -> dict:
    """Analyse ``cfg.model`` and print the table or the JSON object; return the JSON dict."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be table or json, got {cfg.format!r}")
    stack = resolve_stack(cfg.model)
    analysis = analyze(stack, _from_dataset(cfg, "input_shape"), _from_dataset(cfg, "num_classes"))
    result = analysis_to_dict(analysis)
    if cfg.format == "json":
        print(json.dumps(result), flush=True)
    else:
        print(f"model {stack.name}", flush=True)
        print(format_table(analysis), flush=True)
        for warning in analysis.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    return result


@hydra.main(config_path="../configs", config_name="inspect", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    run_main(main)
