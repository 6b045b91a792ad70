"""One parent run per study: the claim in the study's database is atomic across processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

from conftest import BARRIER_TIMEOUT_S, BARRIER_WAIT, CLI_ENV, REPO, release_when_ready

from convnets import study_parent

CLAIMER = BARRIER_WAIT + textwrap.dedent(
    """
    from convnets import study_parent
    print(study_parent.claim(sys.argv[1], 7, "digits_optuna", "run-" + name))
    """
)


def claim_at_once(storage_url: str, barrier, count: int, env=None) -> list[str]:
    """``count`` processes claim the same study's parent at the same moment; what each got
    (``env``: added to their environment)."""
    barrier.mkdir()
    names = [str(i) for i in range(count)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLAIMER,
                storage_url,
                str(barrier),
                name,
                str(BARRIER_TIMEOUT_S),
            ],
            cwd=REPO,
            env={**CLI_ENV, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in names
    ]
    release_when_ready(procs, barrier, names)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * count, [err[-2000:] for _, err in outputs]
    return [out.strip() for out, _ in outputs]


def test_processes_claiming_at_once_agree_on_one_parent(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"  # a fresh file: the table is created racing too
    got = claim_at_once(url, tmp_path / "barrier", 4)
    assert len(set(got)) == 1 and got[0] in {f"run-{i}" for i in range(4)}, got
    rows = sqlite3.connect(tmp_path / "optuna.db").execute(
        f"SELECT study_id, study_name, parent_run_id FROM {study_parent.TABLE_NAME}"
    )
    assert rows.fetchall() == [(7, "digits_optuna", got[0])]
    assert study_parent.claimed(url, 7, "digits_optuna") == got[0]
    assert study_parent.claim(url, 7, "digits_optuna", "late") == got[0]  # a later start joins


def test_a_deleted_studys_claim_is_not_inherited_and_a_replacement_is_compare_and_set(
    tmp_path,
):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert study_parent.claimed(url, 1, "old") is None
    assert study_parent.claim(url, 1, "old", "run-a") == "run-a"
    # SQLite gives a deleted last study's id to the next study: its claim is not that one's.
    assert study_parent.claimed(url, 1, "new") is None
    assert study_parent.claim(url, 1, "new", "run-b") == "run-b"
    # The parent was deleted in MLflow: the first replacement wins, a stale one joins it.
    assert study_parent.replace(url, 1, "run-b", "run-c") == "run-c"
    assert study_parent.replace(url, 1, "run-b", "run-d") == "run-c"
    assert study_parent.claimed(url, 1, "new") == "run-c"
