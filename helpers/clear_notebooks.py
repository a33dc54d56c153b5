"""Clear outputs and execution counts from notebooks: ``python -m helpers.clear_notebooks``.

Committed notebooks carry no outputs, so that diffs show only code and text and the repository
stays small. Without arguments, this clears every notebook in ``notebooks/``.
"""

import argparse
import sys
from pathlib import Path

import nbformat

from .paths import REPO_ROOT


def clear_notebook(path: Path) -> bool:
    """Remove the outputs and execution counts of every code cell; return whether it changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs = []
            cell.execution_count = None
            changed = True
        # nbclient records per-cell execution timestamps here.
        if "execution" in cell.metadata:
            del cell.metadata["execution"]
            changed = True
    if changed:
        nbformat.write(notebook, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks to clear (.ipynb)")
    args = parser.parse_args(argv)

    paths = args.paths or sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            print(f"Notebook {path} not found.", file=sys.stderr)
            return 2
        if clear_notebook(path):
            print(f"Cleared {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
