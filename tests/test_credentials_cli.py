"""No password in any URI: from a config file (a searchpath's ``local/``), an ``${oc.env:...}``
interpolation or the command line, refused in one line before Hydra writes the run's files,
with where the password goes instead for that scheme; a user name alone is accepted."""

from __future__ import annotations

import subprocess

import pytest
from conftest import command
from omegaconf import OmegaConf

import convnets
from convnets.credentials import credentials_in, credentials_in_config

SECRET = "hunter2-s3cret"


def run(tmp_path, *args, **env):
    return command("train.py", *args, cwd=tmp_path, env=env, timeout=120)


def assert_no_secret_left(tmp_path, result, *, allowed=()):
    assert SECRET not in result.stdout + result.stderr
    found = subprocess.run(["grep", "-rl", SECRET, str(tmp_path)], capture_output=True, text=True)
    assert sorted(found.stdout.split()) == sorted(str(p) for p in allowed)


def test_a_password_in_a_config_file_is_refused(tmp_path):
    local = tmp_path / "mine" / "local"
    local.mkdir(parents=True)
    (local / "default.yaml").write_text(
        f"# @package _global_\ntracking:\n  uri: http://bob:{SECRET}@127.0.0.1:9/\n"
    )
    result = run(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'mine'}]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: tracking.uri: a URI with user:password@ would be written to the run's files and "
        "printed; drop the password from the URI and set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD instead"
    ]
    assert_no_secret_left(tmp_path, result, allowed=[local / "default.yaml"])
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(convnets.ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        convnets.train([f"hydra.searchpath=[file://{tmp_path / 'mine'}]"])


def test_a_password_through_an_interpolation_is_refused_before_the_sweep(tmp_path):
    result = run(
        tmp_path,
        "-m",
        "hparams_search=digits_optuna",
        "hydra.sweeper.storage=${oc.env:STUDY_DB}",
        STUDY_DB=f"postgresql://bob:{SECRET}@127.0.0.1:1/optuna",
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: hydra.sweeper.storage: a URI with user:password@")
    assert "PGPASSWORD or ~/.pgpass" in line
    assert_no_secret_left(tmp_path, result)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


def test_a_user_name_alone_is_accepted():
    cfg = OmegaConf.create(
        {"tracking": {"uri": "postgresql://alice@db.internal/mlflow"}, "hydra": {"sweeper": {}}}
    )
    assert credentials_in_config(cfg) is None
    assert credentials_in(["tracking.uri=http://alice@host:5000"]) is None
    assert "PGPASSWORD" in credentials_in(["tracking.uri=postgresql+psycopg://a:b@h/db"])
