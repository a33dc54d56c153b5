"""Run every numbered notebook top to bottom: ``python -m helpers.main_job``.

The notebooks in ``notebooks/`` whose names start with two digits run in name order, each in a
fresh ``python3`` kernel whose working directory is ``notebooks/``. Each executed copy, with
its outputs, goes to ``runs/executed_notebooks/``, also when a cell fails. The job prints
each notebook's wall time and the total, and exits with status 1 naming the notebook and cell
that failed.

Kernels start with ``TQDM_DISABLE=1`` so that progress bars stay out of the saved outputs.
tqdm's console bars honour the variable by themselves. Notebook widget bars and the bars of
diffusers and transformers do not, so notebooks apply it through ``helpers.progress``.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm.auto import tqdm

from .paths import REPO_ROOT, RUNS_DIR
from .progress import PROGRESS_ENV_VAR

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
EXECUTED_DIR = RUNS_DIR / "executed_notebooks"
NOTEBOOK_NAME = re.compile(r"^\d\d.*\.ipynb$")
KERNEL_NAME = "python3"

# Variables added to every kernel's environment.
KERNEL_ENVIRONMENT = {PROGRESS_ENV_VAR: "1"}


class NotebookFailed(Exception):
    """Failure of a notebook cell that raised, timed out or killed its kernel."""

    def __init__(self, notebook: Path, cell_index: int, cell_count: int, cell_source: str):
        self.notebook = notebook
        self.cell_index = cell_index
        first_line = next((line for line in cell_source.splitlines() if line.strip()), "")
        super().__init__(
            f"{notebook.name} failed in cell {cell_index + 1} of {cell_count} "
            f"(counting from 1, markdown cells included), which starts with: {first_line!r}"
        )


def find_notebooks(folder: Path) -> list[Path]:
    """List the notebooks in ``folder`` whose names start with two digits, in name order."""
    return sorted(path for path in folder.iterdir() if NOTEBOOK_NAME.match(path.name))


def execute_notebook(
    path: Path, output_dir: Path, cell_timeout: int | None = None, kernel_name: str = KERNEL_NAME
) -> Path:
    """Execute a notebook in its own folder and write the executed copy into ``output_dir``.

    Returns the executed copy's path. Raises ``NotebookFailed`` after writing the copy, which
    then contains the outputs up to and including the failing cell.
    """
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source]
    current = {"index": 0}
    bar = tqdm(total=len(code_cells), desc=path.name, unit="cell", leave=False)

    def on_cell_start(cell, cell_index):
        current["index"] = cell_index

    def on_cell_executed(cell, cell_index, execute_reply):
        bar.update()

    client = NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=cell_timeout,
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_start=on_cell_start,
        on_cell_executed=on_cell_executed,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    output_path = output_dir / path.name
    try:
        client.execute(env={**os.environ, **KERNEL_ENVIRONMENT})
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        index = current["index"]
        failure = NotebookFailed(path, index, len(notebook.cells), notebook.cells[index].source)
        raise failure from error
    finally:
        bar.close()
        nbformat.write(notebook, output_path)
    return output_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--notebooks-dir",
        type=Path,
        default=NOTEBOOKS_DIR,
        help="folder of the notebooks to run (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=EXECUTED_DIR,
        help="folder for the executed copies (default: %(default)s)",
    )
    parser.add_argument(
        "--cell-timeout",
        type=int,
        default=None,
        help="seconds one cell may run before the job fails (default: no limit)",
    )
    args = parser.parse_args(argv)

    if not args.notebooks_dir.is_dir():
        print(
            f"Notebook folder {args.notebooks_dir} not found; pass an existing folder "
            "with --notebooks-dir.",
            file=sys.stderr,
        )
        return 2
    notebooks = find_notebooks(args.notebooks_dir)
    if not notebooks:
        print(
            f"No notebook in {args.notebooks_dir} has a name starting with two digits, "
            "such as 01_generate.ipynb.",
            file=sys.stderr,
        )
        return 2

    job_start = time.perf_counter()
    for path in notebooks:
        start = time.perf_counter()
        try:
            output_path = execute_notebook(path, args.output_dir, args.cell_timeout)
        except NotebookFailed as failure:
            # The traceback first, so the summary is the last thing on the terminal.
            print(f"{failure.__cause__}\n", file=sys.stderr)
            print(
                f"{failure}\nThe executed copy, with the error, is {args.output_dir / path.name}.",
                file=sys.stderr,
            )
            return 1
        print(f"{path.name}: {time.perf_counter() - start:.1f} s, saved to {output_path}")
    print(f"All {len(notebooks)} notebooks: {time.perf_counter() - job_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
