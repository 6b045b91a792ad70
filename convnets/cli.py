"""What every entry point shares: user errors as one line, no traceback; a quiet start."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from convnets.errors import ConfigError, ConvnetsError

log = logging.getLogger("convnets")
# Read when an entry point imports this module, before anything here sets it.
_TF_LOG_LEVEL_FROM_USER = "TF_CPP_MIN_LOG_LEVEL" in os.environ


def quiet_library_logs() -> None:
    """Keep library start-up chatter off the console, unless the user asked for it.

    MLflow logs at INFO by default (e.g. "Creating initial MLflow database tables") and reads
    ``MLFLOW_LOGGING_LEVEL`` when it is imported; TensorFlow's C++ logging reads
    ``TF_CPP_MIN_LOG_LEVEL`` when it loads (2: errors only). A value the user set wins.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def open_store_in_background(uri: str, http_timeout_s: float) -> Future:
    """Import MLflow and open the store on a thread, so that both (and, on a fresh SQLite file,
    MLflow's schema migrations) overlap TensorFlow's import instead of following it.

    The future's ``result()`` is a :class:`convnets.tracking.Tracker`, or re-raises the store's
    error (a one-line :class:`~convnets.errors.TrackingError`) where the store is first needed.
    """

    def open_store():
        from convnets.tracking import open_store

        return open_store(uri, http_timeout_s=http_timeout_s)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-store")
    future = pool.submit(open_store)
    pool.shutdown(wait=False)  # the thread ends with its one task
    return future


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and enumerate its devices with the process's stderr (fd 2) silenced.

    TensorFlow's native code logs through absl before absl's logging is initialised, so
    ``TF_CPP_MIN_LOG_LEVEL`` cannot hold back lines such as "Could not find cuda drivers" and
    "failed call to cuInit" on a machine without a GPU; only the file descriptor can. Python
    exceptions are unaffected (they are printed after fd 2 is restored). A user who sets
    ``TF_CPP_MIN_LOG_LEVEL`` themselves sees TensorFlow's own output, unchanged.
    """
    quiet_library_logs()
    with contextlib.nullcontext() if _TF_LOG_LEVEL_FROM_USER else _silenced_fd(2):
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA initialisation logs here, once per process


@contextlib.contextmanager
def _silenced_fd(fd: int):
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


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
