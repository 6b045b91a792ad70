"""convnets.cli in-process: Hydra's composition errors as one line, and the Hydra and Keras
internals the project relies on, pinned so that an upgrade that changes them fails here, loudly,
instead of silently bringing back multi-line errors or a stale workaround."""

from __future__ import annotations

import inspect
import shlex
import sys
from importlib.metadata import version

import hydra
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra._internal import utils as hydra_utils
from hydra.errors import HydraException
from hypothesis import given
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException
from packaging.requirements import Requirement

import convnets.config  # noqa: F401  (registers the schemas)
from convnets import cli
from convnets.config import value_kind
from convnets.errors import ConfigError, shell_override

CONFIGS = str(REPO / "configs")

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def composition_error(*overrides: str, config_name: str = "inspect") -> Exception:
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        try:
            compose(config_name, overrides=list(overrides))
        except Exception as err:
            return err
    raise AssertionError(f"{overrides} composed without an error")


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["model.layers.0.filtres=3"],
         "model.layers[0].filtres: unknown key (Key 'filtres' not in 'LayerConfig'); check the spelling (--cfg job prints every key)"),
        (["model.layers=[{filtres:8}]"],  # the list given whole: its override names the key
         "model.layers: filtres: unknown key (Key 'filtres' not in 'LayerConfig'); check the spelling (--cfg job prints every key)"),
        (["model.width=wide"], "model.width: Value 'wide' of type 'str' could not be converted to Float; give a number"),
        (["dataset=nope"],
         "Could not find 'dataset/nope'; available: cifar10, cifar100, digits, fashion_mnist, image_folder, mnist"),
        (["input_shape=[8,8"], "input_shape=[8,8: no viable alternative at input '[8,8'; check that its brackets, braces and quotes pair up (quote the whole override for the shell: 'key=[...]')"),
        (["foo"], "foo: not an override; write key=value (group=option, +key=value to add a key, ~key to remove one)"),
        (["model.width=(1"], "model.width=(1: Error parsing override; check that its brackets, braces and quotes pair up (quote the whole override for the shell: 'key=[...]')"),
    ],
)  # fmt: skip
def test_composition_errors_are_one_line(overrides, line):
    assert cli.config_error_line(composition_error(*overrides)) == line


def test_a_missing_primary_config_is_one_line():
    err = composition_error(config_name="nope")
    assert cli.config_error_line(err) == "Could not find 'nope'"


def test_errors_that_are_not_hydras_are_left_alone():
    assert cli.config_error_line(ValueError("a bug")) is None
    err = composition_error("model.width=wide")
    cli._mark_from_task(err)  # the same error raised by the task is the task's (a bug)
    assert cli.config_error_line(err) is None


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["=3"], "=3"),
        (["model=lenet5", "~=3"], "~=3"),
        (["-m", "trainer.seed=1,2", "+=x"], "+=x"),
        (["--cfg", "job", "model=lenet5", "a.b=1"], None),
        (["-cn", "train", "x"], None),  # not an override at all: Hydra's own message
    ],
)
def test_an_override_without_a_key_is_refused(args, culprit):
    message = cli._keyless_override(args)
    if culprit is None:
        assert message is None
    else:
        assert message.startswith(f"{culprit}: an override needs a key before '='")


# ---------------------------------------------------------------- through @hydra.main


@pytest.fixture
def hydra_app(monkeypatch):
    """A ``@hydra.main`` app on the inspect config (writes nothing) with ``task`` as its task,
    run the way the entry points run it (``cli.run_main``) with ``argv`` as its command line.
    Returns the exit code; Hydra's hook is restored afterwards."""
    monkeypatch.setattr(hydra_utils, "run_and_report", hydra_utils.run_and_report)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if sys.gettrace() is not None:
        pytest.skip("under a tracer/debugger Hydra re-raises instead of reporting")

    def launch(task, *argv: str) -> int:
        @hydra.main(config_path=CONFIGS, config_name="inspect", version_base="1.3")
        @cli.report_user_errors
        def main(cfg):
            return task(cfg)

        monkeypatch.setattr(sys, "argv", ["app", *argv])
        with pytest.raises(SystemExit) as exited:
            cli.run_main(main)
        return exited.value.code

    return launch


def test_a_composition_error_through_hydra_main_is_one_line(hydra_app, capsys):
    code = hydra_app(lambda cfg: None, "model.width=wide")
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: model.width: Value 'wide' of type 'str' could not be converted to Float; give a number"
    ]


def test_a_keyless_override_through_run_main_is_one_line(hydra_app, capsys):
    assert hydra_app(lambda cfg: None, "=3") == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: =3: an override needs a key")


def test_a_user_error_in_the_task_is_one_line(hydra_app, capsys):
    def task(cfg):
        raise ConfigError("model.width: too wide")

    assert hydra_app(task) == 2
    assert capsys.readouterr().err.splitlines() == ["error: model.width: too wide"]


@pytest.mark.parametrize("kind", ["bug", "omegaconf"])
def test_a_bug_in_the_task_keeps_hydras_traceback(hydra_app, capsys, kind):
    """Even an OmegaConf error, when the task raises it, is a bug: Hydra reports it."""

    def task(cfg):
        if kind == "bug":
            raise RuntimeError("a bug")
        return cfg.no_such_key  # struct mode: ConfigAttributeError

    assert hydra_app(task) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "HYDRA_FULL_ERROR=1" in err
    assert not err.startswith("error: ")
    assert ("RuntimeError: a bug" if kind == "bug" else "ConfigAttributeError") in err


def test_hydra_full_error_shows_the_real_exception(monkeypatch):
    monkeypatch.setattr(hydra_utils, "run_and_report", hydra_utils.run_and_report)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")

    @hydra.main(config_path=CONFIGS, config_name="inspect", version_base="1.3")
    @cli.report_user_errors
    def main(cfg):
        return None

    monkeypatch.setattr(sys, "argv", ["app", "model.width=wide"])
    with pytest.raises((HydraException, OmegaConfBaseException)):
        cli.run_main(main)


# ---------------------------------------------------------------- pins


def pinned(name: str) -> Requirement:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    [spec] = [d for d in pyproject["project"]["dependencies"] if Requirement(d).name == name]
    return Requirement(spec)


def test_hydras_private_hook_is_still_what_hydra_main_calls():
    """cli.one_line_config_errors replaces hydra._internal.utils.run_and_report(func). If a
    Hydra release renames it, changes its signature, or stops looking it up as a module global
    from _run_hydra/_run_app, composition errors silently go back to 5-10 lines: revisit
    convnets/cli.py and the hydra-core pin in pyproject.toml."""
    hook = hydra_utils.run_and_report
    assert list(inspect.signature(hook).parameters) == ["func"]
    assert "run_and_report" in hydra_utils._run_hydra.__code__.co_names
    assert "run_and_report" in hydra_utils._run_app.__code__.co_names
    assert "_run_hydra" in hydra.main.__globals__  # what @hydra.main's wrapper runs


def test_hydra_and_keras_are_inside_the_ranges_their_workarounds_were_written_for():
    """convnets/cli.py is verified on hydra-core 1.3.2-1.3.8, and the Keras workaround in
    convnets/distribute.py (_MultiWorkerMirroredStrategy) on Keras 3.15: the pins must keep
    the next minor release out until someone re-verifies them."""
    hydra_pin, keras_pin = pinned("hydra-core"), pinned("keras")
    assert hydra_pin.specifier.contains(version("hydra-core")), hydra_pin
    assert keras_pin.specifier.contains(version("keras")), keras_pin
    assert not hydra_pin.specifier.contains("1.4.0")
    assert not keras_pin.specifier.contains("3.16.0")


# ---------------------------------------------------------------- the end of a finished command

_FINISHING_APP = """
import atexit, sys, threading, time
from pathlib import Path
import hydra
import convnets.config  # noqa: F401
from convnets import cli

out = Path(sys.argv.pop(1))
keep_thread = sys.argv.pop(1) == "thread"


@hydra.main(config_path={configs!r}, config_name="inspect", version_base="1.3")
@cli.report_user_errors
def main(cfg):
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    if keep_thread:  # a non-daemon thread that outlives the task and writes when it ends
        threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
    print("last line", end="", flush=False)  # buffered: the exit must flush it


cli.run_main(main)
(out / "after_run_main").write_text("normal exit")
"""


@pytest.mark.parametrize("case", ["plain", "thread"])
def test_a_finished_command_exits_normally(tmp_path, case):
    """``run_main`` returns when the command is done: the interpreter's own exit follows (a
    profiler or wrapper around the command sees it end), ``atexit`` handlers run, buffered
    output is flushed, and another non-daemon thread is waited for."""
    import subprocess

    script = tmp_path / "app.py"
    script.write_text(_FINISHING_APP.format(configs=CONFIGS))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), case, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("last line")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "after_run_main").read_text() == "normal exit"
    if case == "thread":
        assert (tmp_path / "thread").read_text() == "done"


_STORE_ERROR_LOGGED = """
import logging, sys
from convnets.cli import quiet_library_logs
quiet_library_logs()
import mlflow.store.db.utils  # MLflow configures its loggers when imported
logging.getLogger("mlflow.store.db.utils").error("SQLAlchemy database error (a traceback)")
"""


@pytest.mark.parametrize("level", [None, "DEBUG"])
def test_mlflows_traceback_of_a_store_error_it_raises_again_is_kept_off_the_console(level):
    """A read-only or full SQLite store made MLflow print 22 tracebacks before the one line
    that says what happened; a user who sets MLFLOW_LOGGING_LEVEL still gets them."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    if level is not None:
        env["MLFLOW_LOGGING_LEVEL"] = level
    result = subprocess.run(
        [sys.executable, "-c", _STORE_ERROR_LOGGED],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("SQLAlchemy database error" in result.stderr) == (level is not None)


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc"))))
def test_a_printed_override_pastes_back_as_the_same_value(value):
    """What a hint prints (``checkpoint=<path>``, ``tracking.uri=<uri>``) is one shell word that
    Hydra reads back as the same string, for folders with spaces, non-ASCII letters, quotes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    [word] = shlex.split(shell_override("checkpoint", value))
    [parsed] = OverridesParser.create().parse_overrides([word])
    assert parsed.key_or_group == "checkpoint"
    assert parsed.value() == value


_FREEZING = """
import gc, weakref
from convnets.cli import freeze_loaded_libraries

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

alive = Node()
earlier = cycle()  # garbage already when the libraries are frozen
freeze_loaded_libraries()
frozen = gc.get_freeze_count()
freeze_loaded_libraries()  # once per process
later = cycle()
gc.collect()
print(earlier() is None, frozen > 0, gc.get_freeze_count() == frozen, later() is None)
"""


def test_freezing_the_loaded_libraries_keeps_no_garbage_and_later_cycles_are_collected():
    """The entry points move what the libraries keep alive out of the collector's walks; the
    garbage just made is collected first, not kept for good, and cycles made afterwards (a
    sweep's finished job) are still collected. In a process of its own: freezing is
    process-wide."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", _FREEZING], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.split() == ["True"] * 4, result.stderr[-2000:]


def test_a_ctrl_c_dropped_inside_a_finalizer_is_kept_for_the_training():
    """Python runs a signal handler between two bytecodes; inside a finalizer the exception it
    raises is printed and dropped. The handler keeps the signal for stop_requested()."""
    import signal

    from convnets.cli import stop_requested, stop_signals_interrupt

    class SignalledWhileCollected:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # its handler runs inside this finalizer

    assert stop_requested() is None
    with stop_signals_interrupt():
        SignalledWhileCollected()  # the KeyboardInterrupt is dropped ("Exception ignored")
        assert stop_requested() == signal.SIGINT
        assert stop_requested() is None  # handed on once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    "key, kind",
    [
        ("model.layers", "list"), ("input_shape", "list"), ("model.head.dense", "list"),
        ("compare", "text"), ("tracking.experiment", "text"), ("model.layer_defaults.pool", "text"),
        ("trainer.seed", "value"), ("model.layers.0.filters", "value"), ("optimizer.name", "value"),
        ("model.layers.0.kernel_size", None),  # an int or [kh, kw]
        ("trainer.nosuch", None), ("model.layers.x", None),
    ],
)  # fmt: skip
def test_a_keys_kind_comes_from_the_schema(key, kind):
    """What a refused ``key=a,b`` is told to write: a list, one quoted string, or one value."""
    assert value_kind(key) == kind
