"""Committed notebooks carry no outputs, so diffs stay readable and the repository small."""

from pathlib import Path

import nbformat
import pytest

from helpers.clear_notebooks import clear_notebook
from helpers.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
FIX = "Run `python -m helpers.clear_notebooks` before committing."


def test_notebooks_exist():
    assert NOTEBOOKS, f"No notebook found in {REPO_ROOT / 'notebooks'}."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_has_no_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [
        (index, cell) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
    ]

    with_outputs = [index + 1 for index, cell in code_cells if cell.outputs]
    assert not with_outputs, f"{path.name}: cells {with_outputs} have outputs. {FIX}"

    with_counts = [index + 1 for index, cell in code_cells if cell.execution_count is not None]
    assert not with_counts, f"{path.name}: cells {with_counts} have execution counts. {FIX}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_has_one_parameters_cell(path: Path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [
        index + 1
        for index, cell in enumerate(notebook.cells)
        if "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, f"{path.name}: cells tagged 'parameters': {tagged}; expected one."


def test_clear_notebook_strips_outputs(tmp_path: Path):
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    cell.execution_count = 3
    cell.metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    path = tmp_path / "executed.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)

    assert clear_notebook(path)

    cleared = nbformat.read(path, as_version=4).cells[0]
    assert cleared.outputs == []
    assert cleared.execution_count is None
    assert "execution" not in cleared.metadata
    assert cleared.source == "print(1)"
    assert not clear_notebook(path)
