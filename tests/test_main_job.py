"""The main job on tiny notebooks, executed in real Jupyter kernels."""

from pathlib import Path

import nbformat

from helpers.main_job import find_notebooks, main


def write_notebook(path: Path, *sources: str) -> None:
    cells = [nbformat.v4.new_markdown_cell("A notebook written by the test.")]
    cells += [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


def stdout_text(notebook_path: Path) -> str:
    notebook = nbformat.read(notebook_path, as_version=4)
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def test_find_notebooks_sorts_numbered(tmp_path: Path):
    for name in ["02_b.ipynb", "01_a.ipynb", "scratch.ipynb", "1_short.ipynb", "03_c.txt"]:
        (tmp_path / name).write_text("{}")
    assert [path.name for path in find_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]


def test_main_rejects_folder_without_notebooks(tmp_path: Path, capsys):
    assert main(["--notebooks-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "starting with two digits" in capsys.readouterr().err


def test_main_runs_in_order_and_names_failure(tmp_path: Path, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    output_dir = tmp_path / "executed"
    write_notebook(
        notebooks / "01_ok.ipynb",
        "import os",
        "print('cwd', os.getcwd())\nprint('tqdm', os.environ.get('TQDM_DISABLE'))",
    )
    write_notebook(notebooks / "02_fails.ipynb", "x = 1", "raise ValueError('broken on purpose')")
    write_notebook(notebooks / "03_never.ipynb", "print('ran')")

    status = main(["--notebooks-dir", str(notebooks), "--output-dir", str(output_dir)])
    captured = capsys.readouterr()

    assert status == 1
    assert "01_ok.ipynb: " in captured.out
    assert "02_fails.ipynb failed in cell 3 of 3" in captured.err
    assert "broken on purpose" in captured.err

    first = stdout_text(output_dir / "01_ok.ipynb")
    assert f"cwd {notebooks}" in first
    assert "tqdm 1" in first

    failed = nbformat.read(output_dir / "02_fails.ipynb", as_version=4)
    assert failed.cells[2].outputs[0].output_type == "error"
    assert not (output_dir / "03_never.ipynb").exists()
