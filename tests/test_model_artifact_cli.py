"""``init_from=`` refusals through a real ``python train.py``: one ``error:`` line, the error's
exit status, no traceback, before anything is trained.

What the logged model does (pyfunc, ``mlflow models serve``, search by name and metrics, the
local model, fine-tuning) is tested in this process in test_model_artifact.py.
"""

from __future__ import annotations

import pytest
from conftest import sqlite_store, train_cli

from convnets.errors import ConfigError, TrackingError

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"


def train_fails(tmp_path, *args: str) -> tuple[int, str]:
    """Run train.py expecting a one-line error; return (exit status, that line)."""
    uri = sqlite_store(tmp_path)
    result = train_cli(
        "trainer.verbose=0", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}", *args
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return result.returncode, errors[0]


@pytest.mark.parametrize(
    ("overrides", "exit_code", "starts"),
    [
        (
            ["init_from=0123456789abcdef0123456789abcdef"],
            TrackingError.exit_code,
            "error: init_from=0123456789abcdef0123456789abcdef: no such run",
        ),
        (
            ["trainer.freeze_layers=1"],
            ConfigError.exit_code,
            "error: trainer.freeze_layers=1 freezes layers loaded",
        ),
    ],
    ids=["unknown-run", "freeze-without-init"],
)
def test_init_from_refuses_in_one_line(tmp_path, overrides, exit_code, starts):
    code, line = train_fails(tmp_path, TINY, *overrides)
    assert line.startswith(starts)
    assert code == exit_code
