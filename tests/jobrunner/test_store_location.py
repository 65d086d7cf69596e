"""Where the job store lives and which `--db` values are accepted: one per-user default store
under FLEXJOB_HOME, never created by a read-only command, URLs only, PostgreSQL through psycopg 3."""
from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner

from jobrunner.cli import main
from tests.support.jobs import flexjob_command


def cli(*args, env: dict | None = None, cwd=None) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def test_default_store_is_under_flexjob_home_whatever_the_directory(tmp_path, tiny_model, prompts_file,
                                                                    monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    env = {"FLEXJOB_HOME": str(home), "FLEXJOB_DB": None}
    code, out = cli("enqueue", prompts_file, "--model", tiny_model, "--max-new-tokens", 2, env=env)
    assert code == 0, out
    assert (home / "flexjob.db").is_file() and not (elsewhere / "flexjob.db").exists()
    monkeypatch.chdir(tmp_path)
    code, out = cli("jobs", env=env)
    assert code == 0 and "0/12" in out


@pytest.mark.parametrize("command", [["jobs"], ["status", "--no-watch"], ["results", "1", "-o", "out.parquet"],
                                     ["report", "1"], ["cancel", "1"], ["retry", "1"]])
def test_read_only_commands_never_create_a_store(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    code, out = cli(*command, env={"FLEXJOB_HOME": str(home), "FLEXJOB_DB": None})
    assert code == 1, out
    assert out.splitlines()[0] == f"error: no job store at {home / 'flexjob.db'}"
    assert "hint: enqueue a job first" in out
    assert not home.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["garbage", "store.db", "/tmp/x/flexjob.db"])
def test_a_value_that_is_not_a_url_is_refused(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    code, out = cli("jobs", env={"FLEXJOB_DB": value})
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"error: --db / FLEXJOB_DB value '{value}' is not a database URL"
    assert lines[1].startswith("hint: for a SQLite file write sqlite:///") and "postgresql://" in lines[1]
    assert list(tmp_path.iterdir()) == []


def test_unknown_url_scheme_is_a_user_error(tmp_path):
    code, out = cli("jobs", "--db", "mongodb://localhost/jobs")
    assert code == 1, out
    assert out.splitlines()[0] == "error: unknown database URL scheme 'mongodb' in mongodb://localhost/jobs"
    assert out.splitlines()[1].startswith("hint: use sqlite:///")


def test_help_names_the_environment_and_where_the_store_is(tmp_path):
    code, out = cli("--help", env={"FLEXJOB_HOME": str(tmp_path / "h"), "FLEXJOB_DB": None})
    assert code == 0
    assert "FLEXJOB_DB" in out and "FLEXJOB_HOME" in out and "pip install 'flexjob[postgres]'" in out
    assert f"Job store: sqlite:///{tmp_path / 'h' / 'flexjob.db'} (the default)" in " ".join(out.split())
    code, out = cli("--help", env={"FLEXJOB_DB": "postgresql://app:hunter2@db/jobs"})
    assert "Job store: postgresql+psycopg://app:***@db/jobs (from FLEXJOB_DB)" in " ".join(out.split())
    assert not (tmp_path / "h").exists()


def test_missing_postgres_driver_names_the_extra(tmp_path):
    # psycopg made unimportable in a real subprocess, as on a machine without the extra.
    code = "import sys; sys.modules['psycopg'] = None; from jobrunner.cli import main; main()"
    argv = flexjob_command("jobs", "--db", "postgresql://postgres@127.0.0.1:5432/test")
    result = subprocess.run([argv[0], "-c", code, *argv[3:]], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "FLEXJOB_HOME": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines == ["error: the database driver 'psycopg' for postgresql+psycopg URLs is not installed",
                     "hint: pip install 'flexjob[postgres]'"]


@pytest.mark.postgres
def test_plain_postgresql_url_uses_psycopg3(pg_url, tmp_path):
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    code, out = cli("jobs", "--db", plain, env={"FLEXJOB_HOME": str(tmp_path)})
    assert code == 0 and out.strip() == "no jobs"
    from jobrunner.store.db import open_store

    engine = open_store(plain)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()
