"""`flexjob results`: input order, every row once, --partial, and damaged parts named and repaired."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from jobrunner import store
from jobrunner.store.db import open_store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.errors import UserError
from jobrunner.store.models import JobStatus
from jobrunner.io.results import retry, write_results
from jobrunner.store.models import Job
from tests.support.jobs import SAMPLE_PROMPTS, read_results
from tests.support.store_damage import flip_part_byte, lose_part, truncate_part


@pytest.fixture
def finished_job(tmp_path, tiny_model, prompts_file, run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, id_column="id", shard_rows=5,
                  params=JobParams(max_new_tokens=3)).job
    run_worker(db, block=2)
    return db, store.get_job(db, job.id)


def test_parts_merge_in_input_order_with_every_row_once(tmp_path, finished_job):
    db, job = finished_job
    parts = store.job_parts(db, job.id)
    assert len(parts) == 7  # 3 shards of 5/5/2 rows, blocks of 2 rows
    summary = write_results(db, job.id, tmp_path / "out.parquet")
    assert summary.rows == len(SAMPLE_PROMPTS) and summary.missing_rows == 0
    assert summary.finish_reasons == {"length": len(SAMPLE_PROMPTS)}
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("row").to_pylist() == list(range(len(SAMPLE_PROMPTS)))
    assert table.schema.names == ["row", "id", "prompt", "completion", "completion_tokens", "prompt_tokens",
                                  "finish_reason", "error", "attempt", "block_seconds", "finished_at"]


def test_a_missing_part_is_named_and_retry_regenerates_exactly_its_rows(tmp_path, finished_job, run_worker):
    db, job = finished_job
    before = read_results(write_results(db, job.id, tmp_path / "before.parquet").path)
    part = store.job_parts(db, job.id)[3]
    lose_part(db, part.id)
    with pytest.raises(UserError) as err:
        write_results(db, job.id, tmp_path / "out.parquet")
    assert str(err.value) == f"job {job.id}: result part {part.path} is missing"
    assert f"flexjob retry {job.id}" in err.value.hint
    report = retry(db, job.id)
    assert report.lines[0] == f"result part {part.path} is missing"
    assert f"{part.num_rows} rows of 1 damaged parts will be generated again" in report.lines
    assert store.get_job(db, job.id).status == JobStatus.QUEUED
    summary = run_worker(db, block=2)
    assert summary.rows_done == part.num_rows
    assert read_results(write_results(db, job.id, tmp_path / "after.parquet").path) == before


def test_a_corrupt_part_is_named_never_merged_and_regenerated(tmp_path, finished_job, run_worker):
    db, job = finished_job
    before = read_results(write_results(db, job.id, tmp_path / "before.parquet").path)
    part = store.job_parts(db, job.id)[0]
    flip_part_byte(db, part.id)
    with pytest.raises(UserError, match=rf"^job {job.id}: result part {part.path} is corrupt \(checksum mismatch\)$"):
        write_results(db, job.id, tmp_path / "out.parquet")
    truncate_part(db, part.id, 5)
    with pytest.raises(UserError, match=r"is corrupt \(size 5, expected \d+\)"):
        write_results(db, job.id, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    retry(db, job.id)
    assert run_worker(db, block=2).rows_done == part.num_rows
    assert read_results(write_results(db, job.id, tmp_path / "after.parquet").path) == before


def test_a_part_file_of_an_earlier_flexjob_is_read_from_the_results_dir(tmp_path, finished_job):
    """Stores upgraded from a flexjob that kept parts as files under the job's results_dir."""
    db, job = finished_job
    before = read_results(write_results(db, job.id, tmp_path / "before.parquet").path)
    part = store.job_parts(db, job.id)[2]
    results_dir = tmp_path / "old-results"
    results_dir.mkdir()
    (results_dir / part.path).write_bytes(store.part_bytes(db, part.id))
    lose_part(db, part.id)
    with Session(db) as s, s.begin():
        s.execute(update(Job).where(Job.id == job.id).values(results_dir=str(results_dir)))
    assert read_results(write_results(db, job.id, tmp_path / "after.parquet").path) == before
    (results_dir / part.path).unlink()
    with pytest.raises(UserError, match=f"result part {results_dir / part.path} is missing"):
        write_results(db, job.id, tmp_path / "gone.parquet")


def test_an_incomplete_job_is_refused_unless_partial(tmp_path, tiny_model, prompts_file, run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, shard_rows=5, params=JobParams(max_new_tokens=2)).job
    worker = store.register_worker(db, device="cpu")
    held = store.claim_shard(db, worker, lease_s=600)  # shard 0 stays unfinished
    run_worker(db, block=4)
    with pytest.raises(UserError, match=rf"^job {job.id} is running with 7 of 12 rows done$"):
        write_results(db, job.id, tmp_path / "out.parquet")
    summary = write_results(db, job.id, tmp_path / "out.parquet", partial=True)
    assert (summary.rows, summary.missing_rows) == (7, 5)
    assert pq.read_table(tmp_path / "out.parquet").column("row").to_pylist() == list(range(5, 12))
    assert held.row_end == 5


def test_retry_failed_rows_regenerates_the_blocks_with_error_rows(tmp_path, tiny_model, run_worker):
    from tests.support.jobs import write_prompts

    path = write_prompts(tmp_path / "p.parquet", ["def f():", None, "import os", "class A:"])
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, path, model_dir=tiny_model, params=JobParams(max_new_tokens=2)).job
    run_worker(db)
    with pytest.raises(UserError, match="there is nothing to retry"):
        retry(db, job.id)
    report = retry(db, job.id, failed_rows=True, all_rows=True)
    assert "1 rows of 1 blocks with error rows will be generated again" in report.lines
    run_worker(db)
    job = store.get_job(db, job.id)
    assert (job.status, job.done_rows, job.failed_rows) == (JobStatus.COMPLETED, 4, 1)


def test_retry_failed_rows_keeps_rows_whose_prompt_is_the_problem(tmp_path, tiny_model, run_worker):
    from tests.support.jobs import write_prompts

    path = write_prompts(tmp_path / "p.parquet", ["def f():", None, "", "class A:"])
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, path, model_dir=tiny_model, params=JobParams(max_new_tokens=2)).job
    run_worker(db)
    parts_before = [p.id for p in store.job_parts(db, job.id)]
    report = retry(db, job.id, failed_rows=True)
    assert report.lines == ["2 error rows are kept: their prompt is the problem (null, empty, not UTF-8 or too "
                            "long) and would fail again; pass --all to regenerate them too"]
    assert [p.id for p in store.job_parts(db, job.id)] == parts_before
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
