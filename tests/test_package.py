"""``pip install .`` (not editable) gives a package that works from any folder: the configs ship
inside it, and the console scripts do what ``train.py`` and ``python -m convnets.inspect`` do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import CLI_ENV, REPO

NOT_SOURCE = (".git", "build", "*.egg-info", "outputs", "multirun", "mlruns", "*.db", "*.lock")
NOT_SOURCE += ("__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache", "notebooks")


@pytest.mark.slow
def test_an_installed_package_trains_and_inspects_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside it
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    venv = tmp_path / "venv"
    # The dependencies come from this environment (no network in tests); the package itself
    # is built from the repository and installed as a regular, not editable, copy.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    install = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps"]
        + ["--no-build-isolation", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in CLI_ENV.items() if k != "PYTHONPATH"}  # nothing from the checkout

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=empty, env=env, capture_output=True, text=True, timeout=300)

    where = run(str(venv / "bin" / "python"), "-c", "import convnets; print(convnets.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    inspected = run(str(venv / "bin" / "convnets-inspect"), "model=vgg_small", "dataset=cifar10")
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert inspected.stdout.startswith("model vgg_small") and "block" in inspected.stdout
    as_json = run(
        str(venv / "bin" / "convnets-inspect"), "model=lenet5", "format=json", "dataset=mnist"
    )
    assert json.loads(as_json.stdout)["param_count"] > 0
    trained = run(
        str(venv / "bin" / "convnets-train"),
        "trainer.epochs=1",
        "trainer.verbose=0",
        "model.layers=[{filters:4,pool:max}]",
        "tracking.log_model=false",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.strip().splitlines()[-1].startswith("done: test_accuracy=")
    assert " (convnets-evaluate checkpoint=" in trained.stdout  # the hint names what they ran
    assert (empty / "mlflow.db").is_file() and (empty / "outputs").is_dir()
    refused = run(str(venv / "bin" / "convnets-train"), "trainer.epochs=0")
    assert refused.returncode == 2 and refused.stderr.startswith("error: trainer.epochs")
