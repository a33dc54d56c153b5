import pytest

from helpers.progress import (
    PROGRESS_ENV_VAR,
    configure_progress_bars,
    progress,
    progress_bars_disabled,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("yes", True), ("0", False), ("false", False), ("", False)],
)
def test_progress_bars_disabled_reads_variable(monkeypatch, value, expected):
    monkeypatch.setenv(PROGRESS_ENV_VAR, value)
    assert progress_bars_disabled() is expected


def test_progress_bars_enabled_without_variable(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV_VAR, raising=False)
    assert progress_bars_disabled() is False


def test_progress_follows_variable(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV_VAR, "1")
    bar = progress(range(3))
    assert bar.disable
    assert list(bar) == [0, 1, 2]


def test_progress_explicit_disable_wins(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV_VAR, "1")
    bar = progress(range(3), disable=False)
    assert not bar.disable
    bar.close()


def test_configure_progress_bars_hides_library_bars(monkeypatch):
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    monkeypatch.setenv(PROGRESS_ENV_VAR, "1")
    try:
        configure_progress_bars()
        assert not diffusers.utils.logging.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()


def test_configure_progress_bars_keeps_bars_when_unset(monkeypatch):
    import diffusers.utils.logging

    monkeypatch.setenv(PROGRESS_ENV_VAR, "0")
    configure_progress_bars()
    assert diffusers.utils.logging.is_progress_bar_enabled()
