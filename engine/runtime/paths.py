"""Where the engine keeps its files by default: the disk tier, the converted weight store and the
hardware profiles all live under `$FLEXJOB_HOME`, else `./.flexjob`."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "FLEXJOB_HOME"
DEFAULT_HOME = ".flexjob"


def engine_home() -> Path:
    """`$FLEXJOB_HOME`, else `./.flexjob` (relative to the working directory): the default disk-tier
    directory and where hardware profiles are stored."""
    return Path(os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME)
