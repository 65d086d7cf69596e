"""Shared fixtures: a generated two-layer OPT (once per session), SQLite files in tmp dirs, and a
fresh schema on the real PostgreSQL server per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import engine  # noqa: F401  (before torch loads: the allocator settings the engine runs with)
from tests.support.jobs import SAMPLE_PROMPTS, write_prompts

PG_SERVER_URL = os.environ.get("FLEXJOB_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight OPT with opt-125m's structure, 2 layers, hidden 64 (plus its tokenizer)."""
    from engine.model.config import preset
    from engine.model.synthetic import make_model

    out = tmp_path_factory.mktemp("models") / "opt-test"
    make_model(preset("125m", num_layers=2, hidden_size=64), out)
    return out


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'flexjob.db'}"


@pytest.fixture
def pg_url() -> str:
    """A URL whose search_path is a schema created for this test (dropped afterwards)."""
    from tests.support.pg_scratch import scratch_schema

    with scratch_schema(PG_SERVER_URL) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_url(request, tmp_path) -> str:
    """Runs the test on a SQLite file and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flexjob.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """Twelve short code prompts in two row groups, with string ids."""
    return write_prompts(tmp_path / "prompts.parquet", SAMPLE_PROMPTS,
                         ids=[f"p{i}" for i in range(len(SAMPLE_PROMPTS))], row_group_size=5)


@pytest.fixture(scope="session")
def offload_dir(tmp_path_factory) -> Path:
    """One disk-tier directory for in-process workers, so the model is converted once."""
    return tmp_path_factory.mktemp("offload")


@pytest.fixture
def run_worker(offload_dir):
    """Run an in-process worker until the store is idle; returns its WorkerSummary."""
    from engine.runtime.policy import Policy
    from jobrunner.worker.loop import PlainReporter, Worker, WorkerConfig

    def run(db, *, block: int = 4, policy: Policy | None = None, progress_every: int = 2, lease_s: float = 30.0,
            **config):
        cfg = WorkerConfig(policy=policy or Policy(gpu_batch_size=block), offload_dir=offload_dir, exit_when_idle=True,
                           progress_every=progress_every, lease_s=lease_s, **config)
        return Worker(db, cfg, reporter=PlainReporter()).run()

    return run
