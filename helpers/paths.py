"""Folders of the repository that notebooks and helpers share.

The paths are found relative to this package, so they point into the repository checkout when
the project is installed with ``pip install -e .``. A non-editable install copies only the
``helpers`` package into site-packages, and there ``DATA_DIR`` would not exist.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
TOY_LDM_DIR = DATA_DIR / "toy_ldm"
TOY_ESTIMATORS_DIR = DATA_DIR / "toy_estimators"
RUNS_DIR = REPO_ROOT / "runs"

TOY_LDM_TRAINING_COMMANDS = (
    "python -m helpers.toyworld.train vae && "
    "python -m helpers.toyworld.train ldm && "
    "python -m helpers.toyworld.train export"
)


def require_pipeline_folder(folder: str | Path) -> Path:
    """Return ``folder`` as a Path after checking that it contains a saved diffusers pipeline.

    Without this check, ``DiffusionPipeline.from_pretrained`` reads a missing local folder as a
    Hugging Face model id and fails with a message about the hub.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder

    if folder.resolve() == TOY_LDM_DIR.resolve():
        fix = f"Train and export the embedded toy LDM from {REPO_ROOT}: {TOY_LDM_TRAINING_COMMANDS}"
    else:
        fix = "Pass the folder written by DiffusionPipeline.save_pretrained."
    raise FileNotFoundError(
        f"No diffusers pipeline found at {folder}: model_index.json is missing. {fix}"
    )
