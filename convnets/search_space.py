"""A search's space: Hydra's sweep syntax (``choice``, ``range``, ``interval``, ``tag(log, ...)``)
as Optuna distributions, and a trial's parameters back as Hydra overrides."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from convnets.errors import ConfigError


def space_overrides(params: Mapping[str, Any], arguments: Sequence[str]) -> list[str]:
    """The search space as overrides: ``hydra.sweeper.params``, then the command line's."""
    return [*(f"{key}={value}" for key, value in params.items()), *arguments]


# ---------------------------------------------------------------- the search space


def parse_space(overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Hydra sweep overrides -> (Optuna distributions, fixed overrides), by key.

    The syntax of ``hydra.sweeper.params`` and the command line, as in hydra-optuna-sweeper:
    ``choice(a, b)`` (also ``a,b``) is categorical (lists and dicts, e.g. whole
    ``model.layers`` stacks, become their override strings); ``range(lo, hi[, step])`` is an
    int (a float with a float bound or step) on that grid, ``hi`` excluded;
    ``interval(lo, hi)`` is a float in ``[lo, hi]``, an int with ``tag(int, interval(...))``;
    ``tag(log, ...)`` samples on a log scale. Anything else is fixed. Later overrides of a key
    win.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if not override.is_sweep_override():
            fixed[key] = override.get_value_element_as_str()
            continue
        try:
            space[key] = _distribution(override)
        except ValueError as err:  # Optuna refuses the bounds
            raise ConfigError(_refused_distribution(override, err)) from err
    return space, fixed


def _distribution(override: Any) -> Any:
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if override.is_interval_sweep():
        if "int" in value.tags:  # Hydra parses interval bounds as floats
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    if override.is_range_sweep() and not value.shuffle:
        bounds = (value.start, value.stop, value.step)
        if value.step <= 0:
            raise ValueError("a range's step must be above 0")
        if any(isinstance(v, float) for v in bounds):
            # range(0, 1, 0.25) -> 0, 0.25, 0.5, 0.75 (the stop is excluded, as in Hydra)
            high = value.start + value.step * (
                math.ceil((value.stop - value.start) / value.step) - 1
            )
            return FloatDistribution(value.start, high, step=value.step)
        high = value.start + value.step * ((value.stop - value.start - 1) // value.step)
        return IntDistribution(value.start, high, step=value.step, log=log_scale)
    return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))


def _refused_distribution(override: Any, err: ValueError) -> str:
    """One line for a search-space entry Optuna cannot sample: the entry as written, why,
    and the fix."""
    value = override.value()
    where = override.input_line or override.get_key_element()
    low = getattr(value, "start", None)
    high = getattr(value, "end", getattr(value, "stop", None))
    tags = getattr(value, "tags", set())
    if "log" in tags and low is not None and low <= 0:
        example = "1" if "int" in tags or override.is_range_sweep() else "1e-5"
        why = f"a log scale needs a lower bound above 0 (it is {low:g}); start at e.g. {example}"
    elif override.is_range_sweep() and value.step <= 0:
        why = "a search samples a range upwards: give a step above 0, the smaller bound first"
    elif override.is_range_sweep() and value.start >= value.stop:
        why = f"range({low:g}, {high:g}) is empty (the stop is excluded); put the smaller first"
    elif low is not None and high is not None and low > high:
        why = f"the lower bound {low:g} is above the upper {high:g}; put the smaller first"
    else:
        why = f"{err} (Optuna refuses this search space)"
    return f"{where}: {why}"


def override_value(value: Any) -> str:
    """An Optuna parameter value as Hydra override text (``True`` -> ``true``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def trial_overrides(params: Mapping[str, Any], fixed: Mapping[str, str]) -> list[str]:
    return [f"{k}={override_value(v)}" for k, v in params.items()] + [
        f"{k}={v}" for k, v in fixed.items() if k not in params
    ]
