"""`flexjob report`: the series read from a job's events (built through the real store API on a SQLite
file: blocks, a re-plan, a takeover, an engine error, a crashed release, a graceful stop) and the PNG."""
from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner

from engine.runtime.policy import Policy
from jobrunner import store
from jobrunner.cli import main
from jobrunner.store.db import open_store
from jobrunner.io.enqueue import JobParams
from jobrunner.observe.report import read_report_data, write_report
from jobrunner.store import NewJob, PartRecord

GIB = 1 << 30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NEW_POLICY = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu_percent=50, weights_cpu_percent=50)


def new_job(db, rows: int = 12):
    return store.enqueue_job(db, NewJob(
        name="plotted", priority=0, job_key=uuid.uuid4().hex, input_path="/data/prompts.parquet",
        input_fingerprint="0" * 64, input_size=1, input_mtime_ns=0, prompt_column="prompt", id_column=None,
        model_dir="/models/opt-6.7b", model_fingerprint="0" * 64, params=JobParams().to_dict(),
        results_dir="/results/{job}", shard_rows=4, total_rows=rows))[0]


def commit(db, lease, rows, *, tokens: int, seconds: float, rss_gib: float = 0.0, gpu_gib: float = 0.0):
    stats = {"peak_rss_bytes": int(rss_gib * GIB), "peak_gpu_bytes": int(gpu_gib * GIB), "prefill_s": 0.1,
             "transfers": {"disk_read": [10**9, 1.0]}} if tokens else None
    store.commit_block(db, lease, PartRecord(path=f"p{rows[0]}.parquet", data=b"", row_ids=tuple(rows),
                                             failed_rows=0 if tokens else len(rows), generated_tokens=tokens,
                                             size_bytes=1, sha256="0" * 64, block_seconds=seconds, engine_stats=stats))


@pytest.fixture
def job_run(sqlite_url):
    db = open_store(sqlite_url)
    job = new_job(db)
    first = store.register_worker(db, device="cuda:0")
    lease = store.claim_shard(db, first, lease_s=60)
    commit(db, lease, [0, 1], tokens=16, seconds=2.0, rss_gib=1.0, gpu_gib=2.0)
    commit(db, lease, [2, 3], tokens=16, seconds=1.0, rss_gib=1.25, gpu_gib=2.0)
    store.record_event(db, "replan", job_id=job.id, worker_id=first,
                       message=f"{Policy().describe()} -> {NEW_POLICY.describe()}",
                       data={"old_policy": Policy().to_dict(), "new_policy": NEW_POLICY.to_dict(),
                             "new_describe": NEW_POLICY.describe(), "applied": True})
    store.claim_shard(db, first, lease_s=-1)   # then the first worker dies: its lease is already over
    second = store.register_worker(db, device="cuda:0")
    lease = store.claim_shard(db, second, lease_s=60)
    assert lease.took_over and lease.shard_index == 1
    commit(db, lease, [4, 5, 6, 7], tokens=64, seconds=4.0, rss_gib=1.5, gpu_gib=3.0)
    lease = store.claim_shard(db, second, lease_s=60)
    commit(db, lease, [8], tokens=0, seconds=0.0)  # an error-only block: no throughput point
    store.record_event(db, "engine_error", job_id=job.id, shard_id=lease.shard_id, worker_id=second,
                       message="RuntimeError: boom", data={"rows": [9, 10, 11], "try": 1})
    store.release_shard(db, lease, reason="crashed", error="RuntimeError: boom")
    lease = store.claim_shard(db, second, lease_s=60)
    store.release_shard(db, lease, reason="worker stopped by signal")
    return db, job.id, first, second


def test_series_come_from_the_events(job_run):
    db, job_id, first, second = job_run
    data = read_report_data(db, job_id)
    assert (data.job_name, data.model, data.status, data.done_rows, data.total_rows) == \
        ("plotted", "opt-6.7b", "running", 9, 12)
    assert [b.tokens_per_s for b in data.blocks] == [8.0, 16.0, 16.0]
    assert [b.worker_id for b in data.blocks] == [first, first, second]
    assert [b.peak_rss_bytes / GIB for b in data.blocks] == [1.0, 1.25, 1.5]
    assert [b.peak_gpu_bytes / GIB for b in data.blocks] == [2.0, 2.0, 3.0]
    assert [b.attempt for b in data.blocks] == [1, 1, 2]  # the takeover is the shard's second attempt
    times = [b.t_s for b in data.blocks]
    assert times == sorted(times) and times[0] >= 0
    assert [(m.kind, m.label) for m in data.policy_switches] == [("replan", NEW_POLICY.describe())]
    assert [(m.kind, m.label) for m in data.crashes] == [
        ("lease_expired", "lease takeover"), ("engine_error", "engine error"),
        ("shard_released", "crash: RuntimeError: boom")]
    assert [(m.kind, m.label) for m in data.stops] == [("shard_released", "worker stopped by signal")]
    marker_times = [m.t_s for m in data.policy_switches + data.crashes + data.stops]
    assert marker_times == sorted(marker_times) and times[1] <= marker_times[0] <= times[2]


def test_png_is_written(job_run, tmp_path):
    db, job_id, *_ = job_run
    path = write_report(read_report_data(db, job_id), tmp_path / "out" / "report.png")
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 20_000
    width, height = int.from_bytes(content[16:20], "big"), int.from_bytes(content[20:24], "big")
    assert (width, height) == (1100, 700)


def test_report_command(job_run, sqlite_url, tmp_path):
    db, job_id, *_ = job_run
    result = CliRunner().invoke(main, ["report", str(job_id), "-o", str(tmp_path / "r.png"), "--db", sqlite_url])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {tmp_path / 'r.png'}: 3 blocks, 1 re-plans, 3 crashes or lease takeovers"
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_SIGNATURE)
    result = CliRunner().invoke(main, ["report", "99", "-o", str(tmp_path / "x.png"), "--db", sqlite_url])
    assert result.exit_code == 1 and "error: no job 99" in result.output


def test_a_job_without_blocks_still_gets_a_plot(sqlite_url, tmp_path):
    db = open_store(sqlite_url)
    data = read_report_data(db, new_job(db).id)
    assert data.blocks == () and data.crashes == ()
    assert write_report(data, tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)
