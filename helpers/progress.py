"""Progress bars that non-interactive runs can switch off with ``TQDM_DISABLE=1``.

tqdm (4.66 and later) reads ``TQDM_DISABLE`` for its console bars only. ``tqdm.auto`` inside a
Jupyter kernel returns the widget bar of ``tqdm.notebook``, which passes ``disable=False``
explicitly and so ignores the variable (checked with tqdm 4.70). diffusers 0.42 also passes
``disable`` explicitly in its denoising loop and has its own switch for loading bars.
Notebooks therefore call ``configure_progress_bars()`` once, pass
``disable=progress_bars_disabled()`` to ``DiffusionPipeline.set_progress_bar_config``, and
wrap their own loops in ``progress``.
"""

import os
from collections.abc import Iterable

from tqdm.auto import tqdm

PROGRESS_ENV_VAR = "TQDM_DISABLE"

# Values that leave the bars on. tqdm's console bars treat every non-empty value as "disable",
# so "0" and "false" still hide those.
_FALSE_VALUES = {"", "0", "false", "no", "off"}


def progress_bars_disabled() -> bool:
    """Return whether ``TQDM_DISABLE`` is set to a value that hides progress bars."""
    return os.environ.get(PROGRESS_ENV_VAR, "").strip().lower() not in _FALSE_VALUES


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """Wrap ``iterable`` in a ``tqdm.auto`` bar that ``TQDM_DISABLE`` can hide.

    An explicit ``disable`` keyword wins over the environment variable.
    """
    kwargs.setdefault("disable", progress_bars_disabled())
    return tqdm(iterable, **kwargs)


def configure_progress_bars() -> None:
    """Hide the loading bars of diffusers, transformers and huggingface_hub.

    Does nothing unless ``progress_bars_disabled()``, so interactive sessions keep the
    libraries' own settings.
    """
    if not progress_bars_disabled():
        return

    # Imported here so that reading the setting does not load these libraries.
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
