from pathlib import Path

import pytest

from helpers import paths


def test_repo_root_contains_package():
    assert (paths.REPO_ROOT / "helpers" / "paths.py").is_file()
    assert (paths.REPO_ROOT / "pyproject.toml").is_file()


def test_data_folders_under_repo_root():
    assert paths.DATA_DIR == paths.REPO_ROOT / "data"
    assert paths.TOY_LDM_DIR == paths.DATA_DIR / "toy_ldm"
    assert paths.TOY_ESTIMATORS_DIR == paths.DATA_DIR / "toy_estimators"
    assert paths.RUNS_DIR == paths.REPO_ROOT / "runs"


def test_require_pipeline_folder_accepts_saved_pipeline(tmp_path: Path):
    (tmp_path / "model_index.json").write_text("{}")
    assert paths.require_pipeline_folder(str(tmp_path)) == tmp_path


def test_require_pipeline_folder_names_missing_folder(tmp_path: Path):
    missing = tmp_path / "no_pipeline"
    with pytest.raises(FileNotFoundError, match="model_index.json is missing") as error:
        paths.require_pipeline_folder(missing)
    assert str(missing) in str(error.value)
    assert "save_pretrained" in str(error.value)


def test_require_pipeline_folder_gives_toy_training_commands(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(paths, "TOY_LDM_DIR", tmp_path / "toy_ldm")
    with pytest.raises(FileNotFoundError, match="helpers.toyworld.train export"):
        paths.require_pipeline_folder(tmp_path / "toy_ldm")
