"""Where flexjob keeps its per-user files: the default job store (and, through FLEXJOB_HOME, what
the engine keeps there).

One place per user, whatever directory a command is run from: `$FLEXJOB_HOME`, else the
platform's user data directory (platformdirs: ~/.local/share/flexjob on Linux,
~/Library/Application Support/flexjob on macOS, %LOCALAPPDATA%\\flexjob on Windows).
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.runtime.paths import HOME_ENV_VAR

STORE_FILE = "flexjob.db"


def flexjob_home() -> Path:
    """$FLEXJOB_HOME, else the user data directory for "flexjob" (not created here)."""
    configured = os.environ.get(HOME_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("flexjob", appauthor=False))


def default_store_path() -> Path:
    return flexjob_home() / STORE_FILE
