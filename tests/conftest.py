"""Shared fixtures: the repository root, the training CLI, a real MLflow server."""

from __future__ import annotations

import ast
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import settings

# Under CI (CI=true) property tests draw the same examples on every run, so a CI result
# reproduces; locally they stay random and keep finding new cases.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
# Quiet TensorFlow, and make the package importable from a subprocess whatever the cwd.
CLI_ENV = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, each group keeping its order: the workers hand out tests in
    this order, and a long test handed out last keeps one worker busy after the others have
    finished; short tests at the end fill the gaps instead."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def heavy_modules_loaded(imports: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after ``import <imports>``."""
    code = f"import sys, {imports}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=CLI_ENV, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return ast.literal_eval(out.stdout.strip())


def imported(result: subprocess.CompletedProcess) -> set[str]:
    """The top-level packages a ``python -X importtime`` process imported (from its stderr)."""
    return {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }


def ended_process() -> dict:
    """The record (``convnets.folder_lock``'s: host, pid, start time) of a process of this
    host that has ended."""
    import psutil

    from convnets import folder_lock

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    record = {**folder_lock.this_process(), "pid": proc.pid}
    record["started"] = psutil.Process(proc.pid).create_time()
    proc.wait()
    return record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STORE_TEMPLATE: list[Path] = []  # the one schema this test process created


def sqlite_store(folder: Path) -> str:
    """The URI of ``folder/mlflow.db``, a SQLite MLflow store whose schema exists already: a
    copy of one this test process created once, unless the folder has its store already. Creating MLflow's schema runs its migrations
    (2-3 s a store, most of a short test); the copy is the same file in milliseconds. Tests
    of creating a store (fresh processes racing, a refused config creating nothing) start
    from no file instead."""
    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="convnets-store-")) / "mlflow.db"
        atexit.register(shutil.rmtree, template.parent, ignore_errors=True)
        MlflowClient(f"sqlite:///{template}").search_experiments(max_results=1)
        _STORE_TEMPLATE.append(template)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "mlflow.db").exists():  # the store a test already holds stays as it is
        shutil.copyfile(_STORE_TEMPLATE[0], folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def command(
    script: str,
    *args: str,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    importtime: bool = False,
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` (``train.py``, ``evaluate.py``) of the repository, run in ``cwd``
    (an empty folder shows whatever a command leaves behind), with ``env`` added to the quiet
    test environment. ``importtime``: Python lists every module it imports on stderr (see
    :func:`imported`)."""
    return subprocess.run(
        [sys.executable, *(["-X", "importtime"] if importtime else []), str(REPO / script)]
        + list(args),
        cwd=cwd,
        env={**CLI_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` from the repository root (options: :func:`command`)."""
    return command("train.py", *args, **kwargs)


def wait_for_epochs(proc, run_dir: Path, epochs: int, known=frozenset()) -> str:
    """The id of the run ``proc`` trains with ``hydra.run.dir=RUN_DIR`` (one not in
    ``known``), once it has committed the checkpoint of epoch ``epochs``; fails when training
    ends or stalls first.

    The commit record (``checkpoints/<run id>/state.json``) is written by the training itself
    at the end of each epoch. The store's metrics follow from a thread, and under load they
    lagged so far behind that a short training ended before they showed the epoch a test
    meant to stop it at. A resume sends the committed epochs the store lacks."""
    from convnets import checkpoints

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        for folder in run_dir.glob("checkpoints/*"):
            state = checkpoints.read_state(folder)
            if folder.name not in known and state and state["epoch"] >= epochs:
                return folder.name
        time.sleep(0.02)
    raise AssertionError(f"training ended or stalled before epoch {epochs} was committed")


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail when the server exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


# A racer's start barrier (its argv: ... BARRIER NAME TIMEOUT_S last): it says "ready" once
# imported, then waits until every racer is (the test creates the "go" file), so that all of
# them do the racy thing at the same moment. See release_when_ready.
BARRIER_WAIT = textwrap.dedent(
    """
    import os, sys, time
    barrier, name, timeout_s = sys.argv[-3], sys.argv[-2], float(sys.argv[-1])
    open(os.path.join(barrier, name + ".ready"), "w").close()
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(os.path.join(barrier, "go")):
        if time.monotonic() > deadline:
            sys.exit("the start barrier was never released")
        time.sleep(0.001)
    """
)
BARRIER_TIMEOUT_S = 300  # importing mlflow under load can take a minute; bounded all the same


def release_when_ready(procs, barrier, names, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Create ``barrier/go`` once every racer has written ``<name>.ready``; fail (after ending
    the racers) if one exits first or they are not all ready within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not all((barrier / f"{name}.ready").exists() for name in names):
        exited = [p for p in procs if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            outputs = "\n".join(p.communicate()[0] for p in procs)
            raise AssertionError(f"racers not ready (exited: {len(exited)}):\n{outputs}")
        time.sleep(0.01)
    (barrier / "go").touch()


def start_training(*args: str) -> subprocess.Popen:
    """``python train.py ARGS`` in the background (for tests that signal or kill it)."""
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_after_epochs(
    proc: subprocess.Popen, run_dir: Path, epochs: int, signum: int
) -> tuple[str, str]:
    """Send ``signum`` to a :func:`start_training` process (``hydra.run.dir=RUN_DIR``) once it
    has committed epoch ``epochs`` (:func:`wait_for_epochs`) and wait for it to end: (the run
    id, what it wrote on stderr). The process is killed if it outlives the test."""
    try:
        run_id = wait_for_epochs(proc, run_dir, epochs)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_id, stderr


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started with ``start_new_session=True``, SIGKILL after 15 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_mlflow_server(
    backend_uri: str, root: Path, port: int, log, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``mlflow server`` on ``backend_uri`` at 127.0.0.1:``port``, artifacts proxied to
    ``root/artifacts``, its output to ``log``, in a process group of its own (end it with
    :func:`stop_process_group`). It serves tracking only: MLflow's job execution (on by default
    since MLflow 3, for its GenAI jobs) would start a job runner of eight more processes beside
    each server, which no test here uses."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts); its URL.

    Bounded: the fixture fails if the server is not healthy within 90 s, and the server's
    process group is ended on teardown.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed on teardown
    proc = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, f"{url}/health", root / "server.log", 90)
        yield url
    finally:
        stop_process_group(proc)
        log.close()
