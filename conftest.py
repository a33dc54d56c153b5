"""Settings for the whole test session, including the notebooks that nbval runs.

nbval starts each notebook's kernel from this process's environment, so the variables set here
reach the kernels: ``TQDM_DISABLE=1`` hides progress bars (see ``helpers.progress``) and
``MPLBACKEND=Agg`` renders figures without a display. The sanitize file is passed by absolute
path so that pytest can be started from any folder.
"""

import os
from pathlib import Path

from helpers.progress import PROGRESS_ENV_VAR

REPO_ROOT = Path(__file__).resolve().parent
SANITIZE_FILE = REPO_ROOT / ".nbval_sanitize.cfg"

os.environ[PROGRESS_ENV_VAR] = "1"
os.environ["MPLBACKEND"] = "Agg"


def pytest_configure(config):
    # The option exists only when the nbval plugin is installed.
    if getattr(config.option, "nbval_sanitize_with", "unset") is None:
        config.option.nbval_sanitize_with = str(SANITIZE_FILE)
