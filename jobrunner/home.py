"""Where the default job store lives: `flexjob.db` in flexjob's per-user home (engine.runtime.paths)."""
from __future__ import annotations

from pathlib import Path

from engine.runtime.paths import engine_home as flexjob_home

STORE_FILE = "flexjob.db"

__all__ = ["STORE_FILE", "default_store_path", "flexjob_home"]


def default_store_path() -> Path:
    return flexjob_home() / STORE_FILE
