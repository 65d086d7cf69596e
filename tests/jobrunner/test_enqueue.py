"""`flexjob enqueue` on bad input: each problem is refused with one clear line naming the file
(and column) and the problem; nothing is created. Also fingerprints and streaming."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobrunner import store
from jobrunner.cli import main
from jobrunner.store.db import head_revision, open_store
from jobrunner.io.enqueue import JobParams, enqueue, model_fingerprint
from jobrunner.errors import UserError
from jobrunner.io.inputs import read_rows
from tests.support.jobs import write_prompts


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def enqueue_cli(tmp_path, model, path, *extra) -> tuple[int, str]:
    return cli("enqueue", path, "--model", model, "--db", f"sqlite:///{tmp_path / 'f.db'}", *extra)


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def test_missing_file(tmp_path, tiny_model):
    code, out = enqueue_cli(tmp_path, tiny_model, tmp_path / "nope.parquet")
    assert code == 1
    assert error_line(out) == f"error: input file {tmp_path / 'nope.parquet'} does not exist"


def test_a_directory(tmp_path, tiny_model):
    code, out = enqueue_cli(tmp_path, tiny_model, tmp_path)
    assert code == 1 and error_line(out) == f"error: input {tmp_path} is a directory, not a Parquet file"


def test_a_file_that_is_not_parquet(tmp_path, tiny_model):
    path = tmp_path / "prompts.parquet"
    path.write_text("prompt\nhello\n")
    code, out = enqueue_cli(tmp_path, tiny_model, path)
    assert code == 1 and error_line(out).startswith(f"error: input file {path} is not a readable Parquet file")


def test_a_parquet_file_with_damaged_pages_is_a_user_error(tmp_path, tiny_model):
    # The footer reads, a data page does not: pyarrow raises "Couldn't deserialize thrift".
    path = write_prompts(tmp_path / "p.parquet", [f"prompt number {i}" for i in range(1000)])
    data = bytearray(path.read_bytes())
    data[4:200] = b"\x07" * 196
    path.write_bytes(bytes(data))
    code, out = enqueue_cli(tmp_path, tiny_model, path)
    assert code == 1, out
    assert error_line(out).startswith(f"error: input file {path} is damaged: Couldn't deserialize thrift")
    assert "hint: write the file again" in out and "--debug" not in out


def test_a_parquet_file_with_no_rows(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "empty.parquet", pa.array([], pa.string()))
    code, out = enqueue_cli(tmp_path, tiny_model, path)
    assert code == 1 and error_line(out) == f"error: {path}: the file has 0 rows"


def test_a_missing_column(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "p.parquet", ["hi"], column="text")
    code, out = enqueue_cli(tmp_path, tiny_model, path)
    assert code == 1 and error_line(out) == f"error: {path}: column 'prompt' not found (columns: text)"
    assert "--column" in out  # the hint


def test_a_non_string_column(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "p.parquet", [1, 2, 3])
    code, out = enqueue_cli(tmp_path, tiny_model, path)
    assert code == 1 and error_line(out) == f"error: {path}: column 'prompt' has type int64, not a string type"


def test_a_missing_id_column(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "p.parquet", ["hi"])
    code, out = enqueue_cli(tmp_path, tiny_model, path, "--id-column", "key")
    assert code == 1 and error_line(out) == f"error: {path}: id column 'key' not found (columns: prompt)"


def test_bad_parameters_are_refused_together(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "p.parquet", ["hi"])
    code, out = enqueue_cli(tmp_path, tiny_model, path, "--temperature", "-1", "--top-p", "0")
    assert code == 1
    assert error_line(out) == "error: --temperature must be >= 0, got -1.0; --top-p must be in (0, 1], got 0.0"


def test_a_model_directory_that_is_not_opt(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", ["hi"])
    code, out = enqueue_cli(tmp_path, tmp_path / "no-model", path)
    assert code == 1 and error_line(out) == f"error: model directory {tmp_path / 'no-model'} does not exist"


def test_row_problems_are_counted_but_accepted(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "p.parquet", ["ok", None, "", "fine"])
    code, out = enqueue_cli(tmp_path, tiny_model, path)
    assert code == 0, out
    assert "enqueued job 1 (p): 4 rows in 1 shards" in out
    assert "note: 2 rows will be error rows (1 empty, 1 null)" in out


def test_duplicate_enqueue_returns_the_existing_job_unless_forced(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "p.parquet", ["a", "b"])
    assert enqueue_cli(tmp_path, tiny_model, path)[0] == 0
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(path.read_bytes())  # same content under another name: still the same job
    code, out = enqueue_cli(tmp_path, tiny_model, copy)
    assert code == 0 and "job 1 already exists for this file and these parameters (queued, 0/2 rows)" in out
    code, out = enqueue_cli(tmp_path, tiny_model, path, "--seed", "7")  # another parameter: another job
    assert "enqueued job 2" in out
    code, out = enqueue_cli(tmp_path, tiny_model, path, "--force")
    assert "enqueued job 3" in out


def test_a_database_from_a_newer_version_is_refused(tmp_path, tiny_model):
    from sqlalchemy import text

    from jobrunner.store.db import write_engine

    url = f"sqlite:///{tmp_path / 'f.db'}"
    with write_engine(open_store(url)).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
    path = write_prompts(tmp_path / "p.parquet", ["a"])
    code, out = enqueue_cli(tmp_path, tiny_model, path)
    assert code == 1
    assert error_line(out) == (f"error: database {url} has schema revision ffff_from_the_future, newer than "
                               f"this flexjob (which knows up to {head_revision()})")


def test_an_older_database_is_upgraded_on_open(tmp_path):
    from alembic import command

    from jobrunner.store.db import _alembic_config, head_revision, schema_revision, write_engine

    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    cfg = _alembic_config()
    with write_engine(db).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert schema_revision(db) is None
    assert schema_revision(open_store(url)) == head_revision()


def test_the_job_records_everything_that_changes_the_output(tmp_path, tiny_model):
    path = write_prompts(tmp_path / "p.parquet", ["a", "b", "c"])
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    params = JobParams(max_new_tokens=5, temperature=0.7, top_p=0.8, seed=3, stop=("\n",), dtype="float32")
    job = enqueue(db, path, model_dir=tiny_model, params=params, shard_rows=2).job
    assert JobParams.from_dict(store.get_job(db, job.id).params) == params
    assert job.model_fingerprint == model_fingerprint(tiny_model)
    assert [(s.row_start, s.row_end) for s in store.list_shards(db, job.id)] == [(0, 2), (2, 3)]


def test_rows_are_read_by_range_from_the_overlapping_row_groups(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", [f"prompt {i}" for i in range(25)], ids=list(range(100, 125)),
                         row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups == 3
    rows = read_rows(path, "prompt", "id", 8, 21)
    assert [r.row for r in rows] == list(range(8, 21))
    assert [r.id for r in rows] == list(range(108, 121))
    assert rows[0].prompt == "prompt 8" and rows[-1].prompt == "prompt 20"
    with pytest.raises(UserError, match="changed after enqueue"):
        read_rows(path, "prompt", None, 20, 30)
