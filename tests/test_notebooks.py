"""The notebooks run top to bottom (in a temp working directory) and are stored without outputs."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there():
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_conv2d_anatomy.ipynb",
        "02_compare_runs.ipynb",
        "03_feature_maps.ipynb",
        "04_transfer_learning.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {index} has outputs: strip them"
            assert cell.execution_count is None, f"{path.name} cell {index} has a count"


def cell_text(cell) -> str:
    """Everything a code cell printed or returned, as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def check_anatomy(texts: list[str]) -> None:
    text = "".join(texts)
    [(analysis, keras)] = re.findall(r"conv params: analysis (\d+), Keras (\d+)", text)
    assert analysis == keras == str(8 * 9 + 8)  # 8 3x3 filters on 1 channel, plus biases
    assert "output shape (H, W, filters): (6, 6, 8)" in text  # 8x8, kernel 3, valid


def check_compare(texts: list[str]) -> None:
    text = "".join(texts)
    assert "On the accuracy-vs-parameters front:" in text
    assert re.search(r"best run: [0-9a-f]{32} ", text)
    assert "reproduce_delta" not in text or "verdict" in text  # the best run's reproduce table
    # three seeds (the test's parameters) of two stacks: two groups of n=3, each with a
    # verdict against the baseline
    assert re.search(r"n=3 test_accuracy .*; baseline", text)
    assert re.search(
        r"n=3 test_accuracy .*; (better|worse|indistinguishable) \(Welch's t-test, p=", text
    )
    assert re.search(r"study \(the 4 runs of section 1\): (same best|best changed)", texts[-1])
    assert "rank correlation" in texts[-1]


def check_feature_maps(texts: list[str]) -> None:
    text = "".join(texts)
    assert re.search(r"run [0-9a-f]{32} .*: test_accuracy=0\.\d{4}", text)
    assert re.search(r"theoretical RF \d+x\d+ centred at .* ERF \d+x\d+ px", text)


def check_transfer(texts: list[str]) -> None:
    text = "".join(texts)
    assert re.search(r"digits_5-9_few: \{'train': 25, 'test': \d+\}", text)
    assert "'init_from':" in text and "'init_frozen_layers': '1'" in text
    assert len(re.findall(r"done: test_accuracy=[01]\.\d{4}", text)) == 3  # pretrain + two


# Smaller runs than a reader's, injected after the notebook's cell tagged "parameters" as
# papermill does: the same code, a fraction of the training.
PARAMETERS = {"02_compare_runs": "GRID_EPOCHS = 2\nSEEDS = range(3)"}


def with_parameters(notebook, values: str) -> None:
    """Insert ``values`` as a code cell right after the cell tagged ``parameters``."""
    [index] = [
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    ]
    cell = nbformat.v4.new_code_cell(values, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)


CHECKS = {
    "01_conv2d_anatomy": check_anatomy,
    "02_compare_runs": check_compare,
    "03_feature_maps": check_feature_maps,
    "04_transfer_learning": check_transfer,
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    """Executed in a fresh directory so the notebooks' own MLflow store and runs land there;
    every cell runs, in order, and prints what the prose around it describes."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    notebook = nbformat.read(path, as_version=4)
    if path.stem in PARAMETERS:
        with_parameters(notebook, PARAMETERS[path.stem])
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert figures, f"{path.name} drew no figure"
    texts = [cell_text(cell) for cell in code]
    assert not [t for t in texts if "Traceback" in t], "a cell printed a traceback"
    CHECKS[path.stem](texts)
