"""What every entry point shares: user errors as one line, no traceback; a quiet start.

Entry points end with ``run_main(main)`` (``main`` being their ``@hydra.main`` function): a
:class:`ConvnetsError` raised by the task, and every error Hydra raises while composing the
config (misspelt key, wrong type, unknown group option, bad override), is one
``error: ...`` line on stderr and a non-zero exit. ``HYDRA_FULL_ERROR=1`` shows the traceback.

What this relies on in Hydra, and why (hydra-core 1.3.x; ``tests/test_cli.py`` pins each point
and fails loudly when one changes):

- Hydra has no public hook for composition errors. ``@hydra.main`` composes inside
  ``hydra._internal.utils._run_hydra``, which hands every step to the module-level
  ``run_and_report(func)`` of the same module; that prints the error over five to ten lines and
  exits 1 *before* anything propagates, so neither our task nor a ``try`` around ``main()`` sees
  it. Composing ourselves (``hydra.compose``) would lose ``@hydra.main``'s command line
  (``-m``, ``--cfg``, launchers, sweepers), and forcing ``HYDRA_FULL_ERROR=1`` to make the errors
  propagate would leak into the task, every launched job and subprocess, and drop Hydra's
  trimmed traceback for real bugs. So :func:`one_line_config_errors` replaces that one private
  function, the same in hydra-core 1.3.2 and 1.3.8, with a wrapper that defers to the original
  for everything it does not turn into one line.
- Which error is a composition error is decided without reading Hydra's stack frames: the task
  is wrapped by :func:`report_user_errors`, which marks every exception leaving the task;
  unmarked Hydra/OmegaConf errors were raised while composing. Public attributes give the rest
  (``OverrideParseException.override``, ``MissingConfigException.missing_cfg_file`` and
  ``.options``, OmegaConf's ``full_key``); one message text is still read: Hydra names the
  override it could not apply only in its message (``Could not override 'model.layers'``).
- An override without a key (``python train.py =3``) fails deep in Hydra's defaults-list code
  with a ``ValueError`` that names nothing; :func:`run_main` refuses it first, parsing the command
  line with Hydra's public override parser.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from convnets.credentials import credentials_in
from convnets.errors import (
    ConfigError,
    ConvnetsError,
    Interrupted,
    hydra_override,
    shell_override,
)

log = logging.getLogger("convnets")


def quiet_library_logs() -> None:
    """Keep library start-up chatter off the console, unless the user asked for it.

    MLflow logs at INFO by default (e.g. "Creating initial MLflow database tables") and reads
    ``MLFLOW_LOGGING_LEVEL`` when it is imported; TensorFlow's C++ logging reads
    ``TF_CPP_MIN_LOG_LEVEL`` when it loads (2: errors only). A value the user set wins.
    """
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        # MLflow logs every SQLite error it raises again (a locked, full or read-only
        # database) with its whole traceback at ERROR, then raises it: the store's callers
        # here retry it and report what it means in one line, so the log says it twice and
        # buries that line under screens of tracebacks.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# The cyclic collector's first threshold (CPython's default: 700 allocations). TensorFlow,
# Keras and MLflow create about a million long-lived objects while they import, and at the
# default every few hundred allocations start a collection that walks the young ones again:
# a command's start-up took 9.4 s with the default and 6.4-7.6 s with this (benchmarks/README).
# Cycles are still collected, only in larger batches; explicit gc.collect() (Keras's
# clear_session between a sweep's jobs) is unaffected. The command's process only: a
# notebook or another program importing convnets keeps its own setting.
GC_THRESHOLD = (100_000, 50, 100)


# Once per process, remembered by the cache: asking gc.get_freeze_count() instead walks every
# frozen object, a tenth of a second on each sweep job.
@functools.cache
def freeze_loaded_libraries() -> None:
    """Leave what the loaded libraries keep alive out of the cyclic collector's walks, once
    per process.

    TensorFlow, Keras and MLflow leave several hundred thousand objects that live until the
    process ends, and every full collection walked them all again: Keras's
    ``clear_session(free_memory=True)`` after each job of a sweep, and the interpreter's exit
    after a command's last line. :func:`gc.freeze` (Python's own tool for this) moves them to
    its permanent generation. Only the youngest generation is collected first: the start-up's
    fresh garbage is there (most of it; the few left are frozen with the living), and a full
    collection would walk everything once more. Reference counting still frees frozen
    objects; cycles made from here on are collected as before. The command's process only,
    like :data:`GC_THRESHOLD`; the costs are in benchmarks/README.md.
    """
    gc.collect(0)
    gc.freeze()


_FROM_TASK = "_convnets_raised_by_task"  # set on every exception that leaves a wrapped task


def run_main(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point with every user error as one ``error:`` line, and
    without library start-up chatter on the console (:func:`quiet_library_logs`)."""
    refuse_credentials(sys.argv[1:])  # before Hydra writes the overrides anywhere
    gc.set_threshold(*GC_THRESHOLD)
    quiet_library_logs()
    one_line_config_errors()
    message = _keyless_override(sys.argv[1:]) or missing_searchpath(sys.argv[1:])
    if message is not None and not _full_error():
        _exit(message, ConfigError.exit_code)
    try:
        with stop_signals_interrupt():
            main()
    except KeyboardInterrupt as err:  # outside a training run (that one says more itself)
        print(f"interrupted ({err or 'KeyboardInterrupt'})", file=sys.stderr, flush=True)
        sys.exit(exit_status(err))
    except Exception as err:  # what Hydra raises outside run_and_report (e.g. --info, --help)
        message = config_error_line(err)
        if message is None or _full_error():
            raise
        _exit(message, ConfigError.exit_code)


STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # what Slurm, Kubernetes and a closed terminal send

# The stop signal whose exception may not have reached the code it was meant to stop: Python
# runs a signal handler between two bytecodes of the main thread, and when those are inside a
# finalizer or a garbage-collection callback, the exception it raises is printed ("Exception
# ignored in ...") and dropped; the training would go on as if nothing was pressed. The
# handler keeps the signal here until stop_requested() hands it on.
_pending_stop: list[int] = []


@contextlib.contextmanager
def stop_signals_interrupt():
    """While the block runs, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread,
    so a preempted command stops as on Ctrl-C (the run ends KILLED, its checkpoint kept, the
    resume command printed) instead of dying with the run left RUNNING. Python's default for
    them is to die at once. The exit status is then 128 + the signal's number, as a shell
    reports a process killed by it. Ctrl-C (SIGINT) raises KeyboardInterrupt as Python's own
    handler does; every one of them is also kept for :func:`stop_requested`."""
    import signal

    def interrupt(signum, frame):
        _pending_stop[:] = [signum]
        raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)

    previous = {}
    for name in ("SIGINT", *STOP_SIGNALS):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_requested() -> int | None:
    """The stop signal received since the last call (None: none), for a training to raise
    between two steps in case its exception was dropped (see ``_pending_stop``)."""
    return _pending_stop.pop() if _pending_stop else None


def exit_status(err: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    import signal

    return 128 + getattr(err, "signum", signal.SIGINT)


def refuse_credentials(argv: Sequence[str]) -> None:
    """Exit with one ``error:`` line (exit 2) when :func:`credentials_in` refuses ``argv``."""
    message = credentials_in(argv)
    if message is not None:
        _exit(message, ConfigError.exit_code)


def report_user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`ConvnetsError` into ``error: <message>`` on stderr and a non-zero exit.

    Hydra would print the exception with part of its traceback; the user needs only the
    line that names the key and the fix. ``HYDRA_FULL_ERROR=1`` re-raises for debugging.
    Any other exception is marked as raised by the task (so :func:`one_line_config_errors`
    leaves it to Hydra) and re-raised.
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except ConvnetsError as err:
            if _full_error():
                _mark_from_task(err)
                raise
            _exit(str(err), err.exit_code)
        except BaseException as err:
            _mark_from_task(err)
            raise

    return wrapper


def one_line_config_errors() -> None:
    """Make Hydra's own config errors (misspelt key, wrong type, unknown group option) one
    ``error: <key>: ...`` line with exit code 2, like every other user error.

    Hydra prints them over five to ten lines and only after composing, before our task runs,
    so :func:`report_user_errors` never sees them. Hydra has no hook for this; its private
    ``hydra._internal.utils.run_and_report`` (identical across hydra-core 1.3.2-1.3.8, pinned
    by tests/test_cli.py) is wrapped instead. Errors raised inside the task (bugs) keep Hydra's
    handling and traceback, as does ``HYDRA_FULL_ERROR=1``. Idempotent.
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
            message = config_error_line(err)
            if message is None or _full_error():
                return original(functools.partial(_reraise, err))
            _exit(message, ConfigError.exit_code)

    hydra_utils.run_and_report = run_and_report


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _exit(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _mark_from_task(err: BaseException) -> None:
    with contextlib.suppress(AttributeError):  # a type without __dict__: treated as Hydra's
        setattr(err, _FROM_TASK, True)


def _reraise(err: Exception) -> None:
    raise err


def missing_searchpath(overrides: Sequence[str]) -> str | None:
    """The error line for a ``hydra.searchpath`` folder that is not there, if any. Hydra only
    warns and carries on without it: a user's configs (a model, a local tracking URI) would
    silently not apply."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for arg in overrides:
        if not arg.lstrip("+").startswith("hydra.searchpath="):
            continue
        try:
            [override] = OverridesParser.create().parse_overrides([arg])
        except Exception:  # noqa: BLE001 - Hydra reports an override it cannot parse
            return None
        value = override.value()
        for entry in map(str, value if isinstance(value, list) else [value]):
            if entry.startswith("file://") and not Path(entry.removeprefix("file://")).is_dir():
                return (
                    f"hydra.searchpath: {entry} is not a folder here; give the folder that "
                    "holds your config groups (model/, experiment/, local/), e.g. "
                    "hydra.searchpath=[file:///home/me/my_configs]"
                )
    return None


def _keyless_override(args: list[str]) -> str | None:
    """The error line for a command-line override with nothing before ``=`` (``=3``), if any.

    Flags (``-m``, ``--cfg job``...) and their values are skipped: a flag value never starts
    with ``=``, and anything that does not parse as an override is left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in args if not a.startswith("-") and "=" in a]
    if not candidates:
        return None
    parser = OverridesParser.create()
    for arg in candidates:
        try:
            [override] = parser.parse_overrides([arg])
        except Exception:
            continue  # Hydra reports it (OverrideParseException) with its own message
        if override.key_or_group == "":
            return f"{arg}: an override needs a key before '=' (key=value, group=option, ~key)"
    return None


def config_error_line(err: BaseException, overrides: Sequence[str] | None = None) -> str | None:
    """One line for a composition error; None for anything else (e.g. raised by the task).
    ``overrides``: given as a list in Python (no shell between them); default: this
    command's line."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if getattr(err, _FROM_TASK, False):
        return None  # raised while the task ran: not a composition error
    if isinstance(err, OSError) and err.filename:  # Hydra creating the run or sweep folder
        return (
            f"{err.filename}: {err.strerror or type(err).__name__}; the command's output folder "
            "cannot be created there: run from a writable folder or pick another with "
            "hydra.run.dir=... (hydra.sweep.dir=... for -m)"
        )
    if not isinstance(err, HydraException | OmegaConfBaseException):
        return None
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(err).__name__
    if isinstance(err, MissingConfigException):
        if not err.missing_cfg_file:
            return str(err).strip().splitlines()[0] if str(err).strip() else first
        line = f"Could not find '{err.missing_cfg_file}'"
        return f"{line}; available: {', '.join(err.options)}" if err.options else line
    if isinstance(err, OverrideParseException):
        unquoted = _unquoted_value(err.override, overrides)
        if unquoted is not None:
            return unquoted
        if "=" not in err.override:
            return (
                f"{err.override}: not an override; write key=value (group=option, +key=value "
                "to add a key, ~key to remove one)"
            )
        reason = err.message.strip().splitlines()[0].removesuffix(f" '{err.override}'")
        return (
            f"{err.override}: {reason}; check that its brackets, braces and quotes pair up "
            "(quote the whole override for the shell: 'key=[...]')"
        )
    ambiguous = re.match(r"Ambiguous value for argument '([^=]+)=(.*)'$", first)
    if ambiguous:  # Hydra's fixes follow on lines of their own, cut with the rest
        key, value = ambiguous.groups()
        from convnets.config import value_kind

        instead = {  # what the key holds says which other reading to offer
            "list": f"write {key}=[{value}] for a list",
            "text": f"quote it for one value holding a comma ('{key}=\"{value}\"')",
            "value": "give one value",
            None: f"write {key}=[{value}] for a list, or quote it for a string",
        }[value_kind(key.lstrip("+~"))]
        if value.startswith("["):  # already lists, one per value swept
            instead = "give one value"
        return (
            f"{key}={value}: a comma sweeps, and this is not a sweep (-m); add -m to sweep "
            f"over the values, or {instead}"
        )
    past_end = _index_past_end(cause)
    if past_end is not None:
        return past_end
    unpackaged = re.match(
        r"In '(\w+)/([^']+)': \w+ raised while composing config:\s*Key '(\w+)' not in", str(err)
    )
    if unpackaged and unpackaged[1] == unpackaged[3]:  # its keys landed under its group's name
        group, name = unpackaged[1], unpackaged[2]
        return (
            f"{group}/{name}.yaml: its keys land under '{group}.' (Hydra's package for a file "
            f"in {group}/); make '# @package _global_' its first line so they set top-level "
            "keys such as tracking.uri"
        )
    key = getattr(cause, "full_key", None)
    override = re.search(r"override '?([^=' ]+)", str(err).splitlines()[0])
    if override and key and not _dotted(key).startswith(_dotted(override.group(1))):
        key = f"{override.group(1)}: {key}"  # e.g. a key inside a list given whole
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and key:
        return f"{key}: unknown key ({first}); check the spelling (--cfg job prints every key)"
    if "is not a ListConfig, list or tuple" in first and key:
        return f"{_dotted(key)}: a single value where a list belongs; give {_dotted(key)}=[...]"
    if re.match(r"Cannot convert '(list|ListConfig)' to string", first) and key:
        return f"{_dotted(key)}: a list where one value belongs; give one value"
    wanted = re.search(r"converted to (Integer|Float)$|(not a valid bool)", first)
    if wanted and key:
        what = {"Integer": "a whole number", "Float": "a number", None: "true or false"}
        return f"{key}: {first}; give {what[wanted[1]]}"
    return f"{key}: {first}" if key else first


def _unquoted_value(arg: str, overrides: Sequence[str] | None) -> str | None:
    """An override Hydra could not parse because a value with spaces or non-ASCII letters
    was not quoted: the line that says how to quote it, or None. ``overrides`` None: on this
    command line, so for the shell too (:func:`shell_override`).

    On a command line a value with a space that the shell split into words fails on its
    second word (no ``=``): the words from its ``key=`` on are put back together."""
    if "=" in arg:
        key, value = arg.split("=", 1)
        quoted = (shell_override if overrides is None else hydra_override)(key, value)
        if "=" in value and value.isascii() and not any(c.isspace() for c in value):
            # a group label compare printed (baseline=kernel_size=3), a URL's query
            return f"{arg}: Hydra reads a value holding '=' only when it is quoted; write {quoted}"
        if value.isascii() and not any(c.isspace() for c in value):
            return None
        return (
            f"{arg}: Hydra reads a value with spaces or non-ASCII letters only when it is "
            f"quoted; write it as {quoted}"
        )
    if _names_a_key(arg):  # model.width 2, or model.width = 2: the '=' went missing
        return f"{arg}: an override needs its value: write {arg}=<value> (no space around '=')"
    if overrides is not None:
        return None
    words = sys.argv[1:]
    if arg not in words:
        return None
    here = words.index(arg)
    start = end = here
    while start > 0 and "=" not in words[start] and not words[start].startswith("-"):
        start -= 1
    while end + 1 < len(words) and "=" not in words[end + 1] and not words[end + 1].startswith("-"):
        end += 1
    if start == here or "=" not in words[start]:
        return None
    key, value = words[start].split("=", 1)
    value = " ".join([value, *words[start + 1 : end + 1]])
    return (
        f"{arg}: not an override (key=value): the shell split {key}= at a space; quote the "
        f"whole value: {shell_override(key, value)}"
    )


def _names_a_key(word: str) -> bool:
    """``word`` reads as a config key (``model.width``, ``+trainer.x``, ``resume``) of any
    command, not as a value the shell split off (``runs/a1``, ``v2``)."""
    import dataclasses

    from convnets.config import EvaluateConfig, InspectConfig, TrainConfig

    if not re.fullmatch(r"[+~]?[A-Za-z_]\w*(\.\w+)*", word):
        return False
    sections = {"hydra"} | {
        field.name
        for schema in (TrainConfig, EvaluateConfig, InspectConfig)
        for field in dataclasses.fields(schema)
    }
    return word.lstrip("+~").split(".", 1)[0] in sections


def _index_past_end(err: BaseException) -> str | None:
    """``model.layers.5.filters=8`` on a 4-layer stack: OmegaConf reports a type error on an
    empty entry; say which index, how long the list is, and how to add one."""
    from omegaconf import ListConfig

    parent, index = getattr(err, "parent_node", None), getattr(err, "key", None)
    if not isinstance(parent, ListConfig) or not isinstance(index, int) or index < len(parent):
        return None
    if "could not be converted" in str(err):  # a whole list given, one of its values wrong
        return None
    where = _dotted(str(getattr(err, "full_key", ""))).rsplit(".", 1)[0]
    size = len(parent)
    return (
        f"{where}.{index}: there is no entry {index}: {where} has {size} "
        f"(indices 0-{size - 1}); to add one, give the whole list ({where}=[...])"
    )


def _dotted(key: str) -> str:
    """``model.layers[0].kernel_size`` -> ``model.layers.0.kernel_size`` (override spelling)."""
    return re.sub(r"\[(\d+)\]", r".\1", key)
