"""What every entry point shares: user errors as one line, no traceback."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from convnets.errors import ConfigError, ConvnetsError

log = logging.getLogger("convnets")

_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s]+@")  # scheme://user:password@


def refuse_credentials(argv: Sequence[str]) -> None:
    """Exit with one ``error:`` line (exit 2) when an argument puts ``user:password@`` in a URI.

    Runs before Hydra: Hydra writes every override into the run dir (``.hydra/overrides.yaml``,
    ``config.yaml``, ``hydra.yaml``) before the task starts, even one that is then refused, and
    MLflow prints the tracking URI; a password given there would reach disk and the console.
    MLflow takes credentials from the environment instead. The line never repeats the value.
    """
    for arg in argv:
        if _USERINFO.search(arg):
            key = arg.split("=", 1)[0] if "=" in arg else "an argument"
            print(
                f"error: {key}: a URI with user:password@ would be written to the run's files "
                "and printed; drop the credentials from the URI and set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(ConfigError.exit_code)


def report_user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`ConvnetsError` into ``error: <message>`` on stderr and a non-zero exit.

    Hydra would print the exception with part of its traceback; the user needs only the
    line that names the key and the fix. ``HYDRA_FULL_ERROR=1`` re-raises for debugging.
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except ConvnetsError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)

    return wrapper


def one_line_config_errors() -> None:
    """Make Hydra's own config errors (misspelt key, wrong type, unknown group option) one
    ``error: <key>: ...`` line with exit code 2, like every other user error.

    Hydra prints them over five to ten lines and only after composing, before our task runs,
    so :func:`report_user_errors` never sees them. Hydra has no hook for this; its
    ``run_and_report`` (stable across the pinned hydra-core 1.3.x) is wrapped instead. Errors
    raised inside the task (bugs) keep Hydra's handling and traceback, as does
    ``HYDRA_FULL_ERROR=1``.
    """
    from hydra._internal import utils as hydra_utils

    original = hydra_utils.run_and_report
    if getattr(original, "__wrapped__", None) is not None:
        return  # already installed

    @functools.wraps(original)
    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as err:
            message = _config_error_line(err)
            if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                return original(functools.partial(_reraise, err))
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(ConfigError.exit_code)

    hydra_utils.run_and_report = run_and_report


def _reraise(err: Exception) -> None:
    raise err


def _config_error_line(err: Exception) -> str | None:
    """One line for a composition error; None for anything else (e.g. raised by the task)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if not isinstance(err, HydraException | OmegaConfBaseException):
        return None
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    if "run_job" in frames:
        return None  # raised while the task ran: not a composition error
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(err).__name__
    if isinstance(err, MissingConfigException):
        text = str(err)
        first = text.splitlines()[0].split(": ", 1)[-1]  # drop Hydra's "In 'train': "
        if "Available options in" in text:
            options = [line.strip() for line in text.splitlines() if line.startswith("\t")]
            options = [o for o in options if "provider=" not in o]
            return f"{first}; available: {', '.join(options)}"
        return first
    if isinstance(err, OverrideParseException):
        return f"{err.override}: {first}"
    key = getattr(cause, "full_key", None)
    override = re.search(r"override '?([^=' ]+)", str(err).splitlines()[0])
    if override and key and not _dotted(key).startswith(_dotted(override.group(1))):
        key = f"{override.group(1)}: {key}"  # e.g. a key inside a list given whole
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and key:
        return f"{key}: unknown key ({first}); check the spelling (--cfg job prints every key)"
    return f"{key}: {first}" if key else first


def _dotted(key: str) -> str:
    """``model.layers[0].kernel_size`` -> ``model.layers.0.kernel_size`` (override spelling)."""
    return re.sub(r"\[(\d+)\]", r".\1", key)
