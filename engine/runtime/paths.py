"""Where flexjob keeps its files by default: one place per user, whatever directory a command runs
from. The job store, the disk tier, the converted weight stores and the hardware profiles all live
under `$FLEXJOB_HOME`, else the platform's user data directory (platformdirs: ~/.local/share/flexjob
on Linux, ~/Library/Application Support/flexjob on macOS, %LOCALAPPDATA%\\flexjob on Windows)."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "FLEXJOB_HOME"


def engine_home() -> Path:
    """$FLEXJOB_HOME, else the user data directory for "flexjob" (not created here)."""
    configured = os.environ.get(HOME_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("flexjob", appauthor=False))
