"""A team's setup for real: a PostgreSQL cluster (this machine's own server binaries, a
throwaway cluster on a free loopback port, password authentication), an ``mlflow server`` on
it, a run recorded through the server, its reproduce and evaluation from another working folder,
and one search whose Optuna storage is on PostgreSQL, started by two processes at once. The password
travels only through libpq's ``PGPASSWORD``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (
    CLI_ENV,
    REPO,
    free_port,
    start_mlflow_server,
    stop_process_group,
    wait_until_serving,
)
from mlflow.tracking import MlflowClient

import convnets

PASSWORD = "team-pa55"
TINY = ["model.layers=[{filters:4},{filters:4,pool:max}]", "trainer.verbose=0"]


def _server_binary(name: str) -> str | None:
    """``pg_ctl`` / ``initdb``: on PATH, else where Debian's package puts them."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(candidates[-1]) if candidates else None
    return found


def _as_postgres(name: str, *args: str) -> list[str]:
    """The server refuses to run as root: as the ``postgres`` user then (Debian's package)."""
    command = [_server_binary(name), *args]
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class Cluster:
    """A throwaway PostgreSQL cluster with the databases ``mlflow`` and ``optuna``."""

    def __init__(self, root: Path):
        self.root, self.data, self.port = root, root / "data", free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        subprocess.run(
            _as_postgres("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                         str(self.root / "log"), "-w", "start"),
            check=True, capture_output=True,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "stop"))


@contextlib.contextmanager
def cluster():
    if _server_binary("pg_ctl") is None or _server_binary("initdb") is None:
        pytest.skip("PostgreSQL's server binaries (pg_ctl, initdb) are not installed")
    psycopg = pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="convnets-pg-"))  # not under pytest's root-only tmp
    pg, pwfile = Cluster(root), root / "pwfile"
    pwfile.write_text(PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    subprocess.run(
        _as_postgres("initdb", "-D", str(pg.data), "-U", "postgres", f"--pwfile={pwfile}")
        + ["--auth=scram-sha-256"],
        check=True, capture_output=True,
    )  # fmt: skip
    pg.start()
    try:
        dsn = f"host=127.0.0.1 port={pg.port} user=postgres password={PASSWORD} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name in ("mlflow", "optuna"):
                conn.execute(f"CREATE DATABASE {name}")
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    with cluster() as pg:
        yield {"port": pg.port, "url": pg.url}


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """``mlflow server`` on the PostgreSQL database, artifacts proxied to a folder."""
    root = tmp_path_factory.mktemp("team-server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed on teardown
    proc = start_mlflow_server(
        f"{postgres['url']}/mlflow", root, port, log, env={"PGPASSWORD": PASSWORD}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, f"{url}/health", root / "server.log", 120)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.slow
@pytest.mark.xdist_group("postgres")
def test_a_run_and_its_reproduce_from_another_folder(team_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [
        *TINY,
        "trainer.epochs=2",
        "trainer.deterministic=true",
        f"tracking.uri={team_server}",
    ]
    run = convnets.train(common, output_dir=tmp_path / "alice")
    client = MlflowClient(team_server)
    recorded = client.get_run(run.run_id)
    assert recorded.info.status == "FINISHED"
    assert recorded.data.metrics["test_accuracy"] == run.test_accuracy
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]

    elsewhere = tmp_path / "bob"  # a colleague's working folder: only the server is shared
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = convnets.train(
        [f"reproduce={run.run_id}", f"tracking.uri={team_server}", "trainer.verbose=0"]
    )
    assert again.tags["reproduces"] == run.run_id
    assert again.tags["reproduce_verdict"] == "identical"
    assert str(again.model_path).startswith(str(elsewhere))
    # ... and evaluates the first run's model, fetched through the server's proxied artifacts
    report = convnets.evaluate([f"run_id={run.run_id}", f"tracking.uri={team_server}"])
    assert report.metrics["eval_accuracy"] == pytest.approx(run.test_accuracy, abs=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("postgres")
def test_two_machines_starting_one_search_on_postgres_share_one_parent(
    postgres, team_server, tmp_path
):
    import optuna

    storage = f"{postgres['url']}/optuna"
    args = [sys.executable, "train.py", "-m", "hparams_search=digits_optuna", *TINY,
            "tracking.log_model=false", "trainer.epochs=1", "hydra.sweeper.n_trials=4",
            f"hydra.sweeper.storage={storage}", f"tracking.uri={team_server}"]  # fmt: skip
    # Two machines start the same search command at the same moment: both create the study
    # and a candidate parent run at once, on the shared database and server.
    procs = [
        subprocess.Popen(
            [*args, f"hydra.sweep.dir={tmp_path / folder}"],
            cwd=REPO,
            env={**CLI_ENV, "PGPASSWORD": PASSWORD},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for folder in ("alice", "bob")
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (out[-2000:], err[-3000:])
        assert PASSWORD not in out + err
    os.environ["PGPASSWORD"] = PASSWORD
    try:
        study = optuna.load_study(study_name="digits_optuna", storage=storage)
    finally:
        del os.environ["PGPASSWORD"]
    # n_trials is the study's total; two processes checking it at once may each add one
    assert 4 <= len(study.trials) <= 5
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    client = MlflowClient(team_server)
    experiment = client.get_experiment_by_name("digits_optuna")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1  # one claim won, the other process joined it
    assert parents[0].info.status == "FINISHED"
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(found) - 1  # no orphan: every other run is a trial under it
    # each trial ran once, each in its own run
    assert sorted(t.user_attrs["mlflow_run_id"] for t in study.trials) == sorted(
        r.info.run_id for r in children
    )


@pytest.mark.slow
@pytest.mark.xdist_group("postgres")
def test_processes_claiming_a_studys_parent_at_once_on_postgres_agree(postgres, tmp_path):
    from test_study_parent import claim_at_once

    url = f"{postgres['url']}/optuna"
    got = claim_at_once(url, tmp_path / "barrier", 4, env={"PGPASSWORD": PASSWORD})
    assert len(set(got)) == 1, got


@pytest.mark.slow
def test_a_search_whose_storage_stops_says_so_in_one_line_and_keeps_the_cause(tmp_path):
    from conftest import sqlite_store

    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    with cluster() as pg:
        storage = f"{pg.url}/optuna"
        proc = subprocess.Popen(
            [sys.executable, "train.py", "-m", "hparams_search=digits_optuna", *TINY,
             "hydra.sweeper.n_trials=2", "trainer.epochs=200", f"tracking.uri={uri}",
             f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
            cwd=REPO, env={**CLI_ENV, "PGPASSWORD": PASSWORD},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            trial_run = None
            while trial_run is None:
                assert proc.poll() is None and time.monotonic() < deadline, "no epoch recorded"
                time.sleep(0.2)
                found = [
                    r
                    for r in client.search_runs(
                        [e.experiment_id for e in client.search_experiments()]
                    )
                    if r.data.tags.get("sweep_role") != "parent"
                ]
                if found and client.get_metric_history(found[0].info.run_id, "loss"):
                    trial_run = found[0].info.run_id
            pg.stop("immediate")  # the database server goes down mid-trial
            _, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode not in (0, None)
    assert "Traceback" not in stderr, stderr[-3000:]
    from convnets.tracking import redact

    shown = redact(storage)  # the user name is left out too
    cause = f"error: hydra.sweeper.storage={shown}: the Optuna storage stopped answering ("
    assert stderr.strip().splitlines()[-1].startswith(cause), stderr[-3000:]
    run = client.get_run(trial_run)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith(cause.removeprefix("error: "))
