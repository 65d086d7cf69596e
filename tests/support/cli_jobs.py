"""Jobs made the way a user makes them, for benchmarks and multi-process tests: a generated model
(`flexjob make-model`), a job (`flexjob enqueue`), a store on a SQLite file or on a scratch
schema of the PostgreSQL server (skipped when the server is unreachable)."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, write_prompts
from tests.support.pg_scratch import scratch_schema

PG_SERVER_URL = os.environ.get("FLEXJOB_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> str:
    """`flexjob ARGS` in a subprocess; its stdout, or CalledProcessError with its stderr."""
    done = subprocess.run(flexjob_command(*args), capture_output=True, text=True, env=env, cwd=cwd,
                          check=False)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return done.stdout


def tiny_model(path: Path) -> Path:
    """`flexjob make-model tiny` into `path`, once (a marker file is written last)."""
    done = path / ".complete"
    if not done.is_file():
        run_cli("make-model", "tiny", "-o", str(path))
        done.write_text("ok\n")
    return path


def code_prompts(path: Path, rows: int) -> Path:
    """`rows` distinct short code prompts in a Parquet file."""
    return write_prompts(path, [f"{SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]} # {i}" for i in range(rows)])


def enqueue_cli(url: str, prompts: Path, model: Path, *args: str, cwd: Path | None = None) -> int:
    """`flexjob enqueue` a new job; its id (the newest job of the store)."""
    from jobrunner import store
    from jobrunner.store.db import open_store

    run_cli("enqueue", str(prompts), "--model", str(model), "--db", url, "--force", *args, cwd=cwd)
    return store.list_jobs(open_store(url, must_exist=True), limit=1)[0].id


def postgres_unreachable(server_url: str = PG_SERVER_URL) -> str | None:
    """Why the PostgreSQL server cannot be used, or None when it answers."""
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(server_url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means: no server for this run
        return f"PostgreSQL at {server_url} unreachable: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


@contextmanager
def store_url(backend: str, work: Path) -> Iterator[str]:
    """A fresh store: `sqlite` a new file under `work`, `postgres` a scratch schema (dropped after)."""
    if backend == "sqlite":
        work.mkdir(parents=True, exist_ok=True)
        path = work / "flexjob.db"
        for stale in work.glob("flexjob.db*"):
            stale.unlink()
        yield f"sqlite:///{path}"
        return
    with scratch_schema(PG_SERVER_URL, prefix="fjbench") as url:
        yield url
