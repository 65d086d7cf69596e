"""The status dashboard and its `--json` snapshot, over a store built through the real store API on a
real SQLite file (and the same snapshot on PostgreSQL): queued, running (live heartbeat), stale
(its worker died), completed, failed and cancelled jobs; a live, two stale and a stopped worker; and
live, stale and dead workers of real processes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from datetime import timedelta

import pytest
from click.testing import CliRunner
from rich.console import Console

from engine.planning.hardware import HardwareProfile
from engine.runtime.policy import CompressionConfig, Policy
from jobrunner import store
from jobrunner.worker.bandwidth_monitor import ReplanDecision
from jobrunner.cli import main
from jobrunner.observe.dashboard import format_duration, render_dashboard
from jobrunner.store.db import open_store
from jobrunner.store.db_url import mask_url
from jobrunner.io.enqueue import JobParams
from jobrunner.errors import UserError
from jobrunner.store.models import utcnow
from jobrunner.observe.snapshot import SCHEMA, SnapshotOptions, read_snapshot
from jobrunner.store.queries import open_store_for_reading
from jobrunner.worker.liveness import host_id, process_start_time, take_over_dead
from tests.support.holders import kill, start_holder
from jobrunner.store import EventKind, NewJob, PartRecord
from jobrunner.store.base import write_tx
from tests.support.jobs import flexjob_command

GIB = 1 << 30
LIVE_POLICY = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu_percent=50, weights_cpu_percent=50,
                     compress_weight=True, compression=CompressionConfig(num_bits=4, group_size=64))
BLOCK_STATS = {"peak_rss_bytes": int(1.5 * GIB), "peak_gpu_bytes": 3 * GIB, "prefill_s": 0.2,
               "transfers": {"disk_read": [1_000_000_000, 2.0], "cpu_to_gpu": [4_000_000_000, 0.5]}}
INPUT_CHANGED = "input file /data/prompts.parquet changed after enqueue"


def new_job(db, name: str, *, rows: int, shard_rows: int = 4, priority: int = 0):
    job, _ = store.enqueue_job(db, NewJob(
        name=name, priority=priority, job_key=uuid.uuid4().hex, input_path="/data/prompts.parquet",
        input_fingerprint="0" * 64, input_size=1, input_mtime_ns=0, prompt_column="prompt", id_column=None,
        model_dir="/models/opt-1.3b", model_fingerprint="0" * 64, params=JobParams(max_new_tokens=8).to_dict(),
        results_dir="/results/{job}", shard_rows=shard_rows, total_rows=rows))
    return job


def commit(db, lease, rows: list[int], *, tokens: int):
    return store.commit_block(db, lease, PartRecord(
        path=f"part-{lease.shard_index}-{rows[0]}.parquet", data=b"", row_ids=tuple(rows), failed_rows=0,
        generated_tokens=tokens, size_bytes=100, sha256="0" * 64, block_seconds=2.5, engine_stats=BLOCK_STATS))


def build_store(db) -> dict:
    """Every state a dashboard meets; returns the ids the tests look for."""
    start = utcnow()
    past = start - timedelta(minutes=10)
    finisher = store.register_worker(db, device="cuda:0", policy=Policy().to_dict())
    done = new_job(db, "done-run", rows=4)
    commit(db, store.claim_shard(db, finisher, lease_s=60), [0, 1, 2, 3], tokens=32)
    broken = new_job(db, "broken-input", rows=4)
    store.fail_job_for_lease(db, store.claim_shard(db, finisher, lease_s=60), INPUT_CHANGED)
    store.stop_worker(db, finisher, reason="idle")

    stalled = new_job(db, "dead-worker", rows=8)
    dead = store.register_worker(db, device="cuda:0")
    store.claim_shard(db, dead, lease_s=60, now=past)           # its lease ran out 9 minutes ago

    live = new_job(db, "live", rows=12, priority=5)
    crashed = store.register_worker(db, device="cuda:0")
    store.claim_shard(db, crashed, lease_s=60, now=past)        # the live job's first holder died
    worker = store.register_worker(db, device="cuda:0", policy=Policy().to_dict())
    first = store.claim_shard(db, worker, lease_s=60, now=start)  # 540 s after that lease ran out, exactly
    assert first.job_id == live.id and first.took_over
    commit(db, first, [0, 1, 2, 3], tokens=32)
    second = store.claim_shard(db, worker, lease_s=60)
    commit(db, second, [4, 5], tokens=16)
    decision = ReplanDecision(block_index=1, old_policy=Policy(), new_policy=LIVE_POLICY,
                              profiled_gbps={"disk_read": 1.0, "cpu_to_gpu": 10.0}, measured_gbps={"disk_read": 0.5},
                              drifted_links=("disk_read",), old_tokens_per_s=10.0, new_tokens_per_s=12.5, apply=True)
    store.worker_seen(db, worker, policy=LIVE_POLICY.to_dict())
    store.record_event(db, EventKind.REPLAN, job_id=live.id, shard_id=second.shard_id, worker_id=worker,
                       message=f"{Policy().describe()} -> {LIVE_POLICY.describe()}",
                       data={"old_policy": Policy().to_dict(), "new_policy": LIVE_POLICY.to_dict()}
                       | decision.to_event())
    store.heartbeat(db, second, lease_s=60)

    queued = new_job(db, "waiting", rows=12)
    cancelled = new_job(db, "cancelled-one", rows=12)
    store.cancel_job(db, cancelled.id)
    return {"done": done.id, "broken": broken.id, "stalled": stalled.id, "live": live.id, "queued": queued.id,
            "cancelled": cancelled.id, "worker": worker, "dead": dead, "crashed": crashed, "finisher": finisher}


@pytest.fixture
def populated(sqlite_url):
    db = open_store(sqlite_url)
    return db, build_store(db)


def render_text(snapshot: dict, width: int = 200) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(render_dashboard(snapshot))
    return console.export_text()


def line_with(text: str, *needles: str) -> str:
    lines = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, f"{needles} on {len(lines)} lines of:\n{text}"
    return lines[0]


def stale_for_s(line: str) -> int:
    """Seconds since a stale worker's heartbeat, read off its "9m59s STALE" cell (truncated to whole seconds)."""
    found = re.search(r"(\d+)m(\d\d)s STALE", line)
    assert found, line
    return int(found[1]) * 60 + int(found[2])


def job_line(text: str, name: str) -> str:
    """The jobs-table row of the job called `name` ("│  ID  name  model ...")."""
    rows = [line for line in text.splitlines() if len(line.split()) > 3 and line.split()[2] == name]
    assert len(rows) == 1, f"job {name!r} on {len(rows)} lines of:\n{text}"
    return rows[0]


def test_jobs_table_shows_every_state(populated):
    db, ids = populated
    text = render_text(read_snapshot(db))
    live = job_line(text, "live")
    assert "running" in live and "STALE" not in live and "6/12 50%" in live
    assert "opt-1.3b" in live
    *_, rate_now, rate_avg, eta, age = live.split("│")[1].split()
    assert float(rate_now) == pytest.approx(48 / 60, abs=0.1)  # 48 tokens in the last minute
    assert float(rate_avg) == pytest.approx(48 / 600, abs=0.05)  # since its first claim 10 minutes ago
    assert eta.endswith("s") and age.endswith("s")
    assert "running STALE" in job_line(text, "dead-worker") and "0/8 0%" in job_line(text, "dead-worker")
    assert "completed" in job_line(text, "done-run") and "4/4 100%" in job_line(text, "done-run")
    assert "failed" in job_line(text, "broken-input") and "0/4 0%" in job_line(text, "broken-input")
    assert "queued" in job_line(text, "waiting") and "0/12 0%" in job_line(text, "waiting")
    assert "cancelled" in job_line(text, "cancelled-one")
    assert "6 jobs" in text and "1 worker live" in text and "2 stale" in text


def test_workers_table_shows_policy_bandwidth_memory_and_staleness(populated):
    db, ids = populated
    text = render_text(read_snapshot(db))
    first = line_with(text, " shard 1 block 2")
    second, third = text[text.index(first):].splitlines()[1:3]
    assert ids["worker"] in first and "ago" in first and "STALE" not in first
    assert "job " in first and "4×2 = 8 rows" in first            # gpu_batch_size × num_gpu_batches = block
    assert "disk_read 0.50/1.00" in first                          # measured (2 GB in 4 s) / profiled
    assert "RSS 1.5 GiB" in first and "GPU 3.0 GiB" in second      # peaks over its latest blocks
    assert "cuda:0" in second and "attempt 1 · 2/4 rows" in second
    assert "w 50/50 c 100/0 a 100/0" in second and "cpu_to_gpu 8.00/10.00" in second
    assert "9.6 tok/s" in third and "4-bit g64: weights" in third  # 48 tokens in 5 s of blocks
    stale = [line for line in text.splitlines() if "STALE" in line and "running" not in line]
    assert len(stale) == 2 and all(595 <= stale_for_s(line) <= 630 for line in stale)  # 10 minutes + this test
    assert any(f"lost job {ids['live']} shard 0" in line for line in stale)  # the one whose shard was taken over
    stopped = [line for line in text.splitlines() if line.split()[1:2] == [ids["finisher"]]
               and "stopped" in line]
    assert len(stopped) == 1 and "8×1 = 8 rows" in stopped[0]


def test_events_show_replans_takeovers_failures_and_cancels(populated):
    db, ids = populated
    text = render_text(read_snapshot(db, SnapshotOptions(event_limit=30)))
    replan = line_with(text, " replan ")
    assert "re-planned 8x1 [100 0 100 0 100 0] overlap -> 4x2 [50 50 100 0 100 0] overlap,cw" in replan
    assert "disk_read 0.50 GB/s measured vs 1.00 profiled, predicted +25%" in replan
    assert (f"lease takeover: took over shard 0 (attempt 2) from worker {ids['crashed']}: its lease ran out 540 s ago"
            in line_with(text, "lease_expired"))
    assert INPUT_CHANGED in line_with(text, "job_failed")
    assert "cancelled" in line_with(text, "job_cancel ")
    assert "block_committed" not in text and "shard_claimed" not in text  # routine: shown as progress


def test_focus_on_one_job(populated):
    db, ids = populated
    snapshot = read_snapshot(db, SnapshotOptions(job_id=ids["live"]))
    assert [j["id"] for j in snapshot["jobs"]] == [ids["live"]]
    assert [w["id"] for w in snapshot["workers"]] == [ids["worker"]]
    assert {e["job_id"] for e in snapshot["events"]} == {ids["live"]}
    text = render_text(snapshot)
    assert f"Job {ids['live']}" in text
    assert "1 pending · 1 leased · 1 done" in line_with(text, "shards")
    assert "max_new_tokens=8" in line_with(text, "params")
    broken = render_text(read_snapshot(db, SnapshotOptions(job_id=ids["broken"])))
    assert INPUT_CHANGED in line_with(broken, "error ")
    with pytest.raises(UserError, match="no job 999"):
        read_snapshot(db, SnapshotOptions(job_id=999))


JOB_KEYS = {"id", "name", "model", "model_dir", "status", "priority", "total_rows", "done_rows", "failed_rows",
            "progress", "generated_tokens", "tokens_per_s_recent", "tokens_per_s_average", "eta_s", "age_s",
            "created_at", "started_at", "finished_at", "error", "shards", "expired_leases", "stale", "workers",
            "params"}
WORKER_KEYS = {"id", "hostname", "pid", "device", "status", "state", "started_at", "last_seen_at", "heartbeat_age_s",
               "stale", "current", "lost", "policy", "rows_done", "tokens_generated", "tokens_per_s_recent", "bandwidth",
               "peak_rss_bytes", "peak_gpu_bytes"}
CURRENT_KEYS = {"job_id", "job_name", "shard_id", "shard_index", "attempt", "block", "shard_done_rows", "shard_rows",
                "lease_expires_at"}
POLICY_KEYS = {"gpu_batch_size", "num_gpu_batches", "block_size", "percents", "compress_weight", "compress_cache",
               "compression_bits", "compression_group_size", "overlap", "cpu_cache_compute"}
EVENT_KEYS = {"id", "at", "age_s", "kind", "job_id", "shard_id", "worker_id", "message", "summary", "data"}


def check_schema(snapshot: dict, ids: dict) -> None:
    assert set(snapshot) == {"schema", "generated_at", "database", "focus_job_id", "recent_window_s", "stale_after_s",
                             "jobs", "workers", "events"}
    assert snapshot["schema"] == SCHEMA and snapshot["generated_at"].endswith("Z")
    assert all(set(job) == JOB_KEYS for job in snapshot["jobs"])
    assert all(set(w) == WORKER_KEYS for w in snapshot["workers"])
    assert all(set(e) == EVENT_KEYS for e in snapshot["events"])
    jobs = {job["id"]: job for job in snapshot["jobs"]}
    live = jobs[ids["live"]]
    assert live["status"] == "running" and live["progress"] == 0.5 and live["generated_tokens"] == 48
    assert live["shards"] == {"pending": 1, "leased": 1, "done": 1, "failed": 0, "cancelled": 0}
    assert live["workers"] == [ids["worker"]] and not live["stale"] and live["eta_s"] > 0
    assert jobs[ids["stalled"]]["stale"] and jobs[ids["stalled"]]["expired_leases"] == 1
    assert jobs[ids["broken"]]["error"] == INPUT_CHANGED and jobs[ids["done"]]["tokens_per_s_recent"] is None
    assert [jobs[ids[k]]["status"] for k in ("done", "broken", "queued", "cancelled")] == \
        ["completed", "failed", "queued", "cancelled"]
    workers = {w["id"]: w for w in snapshot["workers"]}
    worker = workers[ids["worker"]]
    assert set(worker["current"]) == CURRENT_KEYS and set(worker["policy"]) == POLICY_KEYS
    assert worker["current"]["block"] == 2 and worker["current"]["job_id"] == ids["live"]
    assert worker["policy"]["percents"] == [50, 50, 100, 0, 100, 0] and worker["policy"]["block_size"] == 8
    assert worker["bandwidth"]["disk_read"] == {"measured_gbps": 0.5, "profiled_gbps": 1.0, "bytes": 2_000_000_000,
                                                "seconds": 4.0}  # its two blocks
    assert worker["peak_rss_bytes"] == int(1.5 * GIB) and worker["peak_gpu_bytes"] == 3 * GIB
    assert not worker["stale"] and workers[ids["dead"]]["stale"] and workers[ids["crashed"]]["stale"]
    assert workers[ids["dead"]]["current"] is not None and workers[ids["crashed"]]["current"] is None  # taken over
    assert workers[ids["crashed"]]["lost"] == {"job_id": ids["live"], "shard_index": 0, "attempt": 2,
                                               "holder": ids["worker"]}
    assert workers[ids["worker"]]["lost"] is None and workers[ids["dead"]]["lost"] is None
    assert workers[ids["finisher"]]["status"] == "stopped" and not workers[ids["finisher"]]["stale"]
    kinds = [e["kind"] for e in snapshot["events"]]
    assert kinds[:2] == ["job_cancel", "job_enqueued"] and "replan" in kinds and "lease_expired" in kinds


def test_json_snapshot_schema_through_the_cli(populated, sqlite_url):
    db, ids = populated
    result = CliRunner().invoke(main, ["status", "--json", "--events", "20", "--db", sqlite_url])
    assert result.exit_code == 0, result.output
    snapshot = json.loads(result.output)
    check_schema(snapshot, ids)
    assert snapshot["database"] == sqlite_url


def test_print_once_when_not_a_terminal(populated, sqlite_url):
    result = CliRunner().invoke(main, ["status", "--db", sqlite_url])
    assert result.exit_code == 0 and "live" in result.output and "Recent events" in result.output
    assert CliRunner().invoke(main, ["status", "--json", "--watch", "--db", sqlite_url]).exit_code == 2


@pytest.mark.postgres
def test_snapshot_on_postgresql_from_another_process_with_the_password_masked(pg_url):
    ids = build_store(open_store(pg_url))
    # The test server trusts local connections, so a password in the URL is accepted and ignored.
    with_password = pg_url.replace("://postgres@", "://postgres:hunter2@")
    assert with_password != pg_url
    result = subprocess.run(flexjob_command("status", "--json", "--events", "20"), capture_output=True, text=True,
                            env={**os.environ, "FLEXJOB_DB": with_password}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    snapshot = json.loads(result.stdout)
    check_schema(snapshot, ids)
    assert snapshot["database"].startswith("postgresql+psycopg://postgres:***@127.0.0.1:5432/test")


def test_reading_never_waits_for_a_writer(populated, sqlite_url):
    """A worker holding SQLite's write lock (mid-commit) does not stall `status`, and vice versa."""
    db, _ = populated
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with write_tx(db):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        snapshot = read_snapshot(open_store_for_reading(sqlite_url))
        assert time.monotonic() - started < 2.0 and len(snapshot["jobs"]) == 6
    finally:
        release.set()
        thread.join()


def test_missing_store_is_refused_without_creating_it(tmp_path):
    with pytest.raises(UserError, match="no job store at"):
        open_store_for_reading(f"sqlite:///{tmp_path / 'nope.db'}")
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://app:hunter2@db.example:5432/jobs", "postgresql+psycopg2://app:***@db.example:5432/jobs"),
    ("postgresql://app@db/jobs?sslmode=require&password=hunter2",
     "postgresql://app@db/jobs?sslmode=require&password=***"),
    ("postgresql://app:p%40ss:w@db/jobs", "postgresql://app:***@db/jobs"),
    ("sqlite:////var/lib/flexjob/flexjob.db", "sqlite:////var/lib/flexjob/flexjob.db"),
    ("flexjob.db", "flexjob.db"),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown and "hunter2" not in mask_url(url)


def test_durations_read_naturally():
    assert [format_duration(s) for s in (None, 5, 75, 3725, 90000)] == ["-", "5s", "1m15s", "1h02m", "1d01h"]


def test_workers_are_live_stale_or_dead_and_a_dead_ones_takeover_is_told(tmp_path, sqlite_url):
    """A SIGKILLed worker process of this host shows dead at once (not stale for a lease's length);
    one of another machine that stopped renewing shows stale; the takeover event names the shard."""
    db = open_store(sqlite_url)
    new_job(db, "two-shards", rows=8, shard_rows=4)
    killed, held = start_holder(sqlite_url, lease_s=60)
    quiet, remote = start_holder(sqlite_url, lease_s=600, ago_s=120, host_id="another-machine/pid:[1]")
    kill(killed)
    me = store.register_worker(db, device="cpu", host_id=host_id(), process_started_at=process_start_time(os.getpid()))
    try:
        states = {w["id"]: w["state"] for w in read_snapshot(db)["workers"]}
        assert states == {held["worker_id"]: "dead", remote["worker_id"]: "stale", me: "live"}
        text = render_text(read_snapshot(db))
        assert "1 worker live · 1 stale · 1 dead" in text
        assert f"DEAD   dead on job 1 shard {held['shard_index']}" in line_with(text, held["worker_id"], "DEAD")
        assert 115 <= stale_for_s(line_with(text, remote["worker_id"], "STALE")) <= 150
        take_over_dead(db, me)
        lease = store.claim_shard(db, me, lease_s=60)
        assert lease.shard_index == held["shard_index"] and lease.attempt == 2
        snapshot = read_snapshot(db)
        [dead] = [w for w in snapshot["workers"] if w["id"] == held["worker_id"]]
        assert (dead["status"], dead["state"]) == ("dead", "dead") and dead["lost"]["holder"] == me
        assert f"lost job 1 shard {held['shard_index']}" in line_with(render_text(snapshot), "DEAD")
        [event] = [e for e in snapshot["events"] if e["kind"] == "worker_dead"]
        assert event["summary"] == (f"dead worker: took over shard {held['shard_index']} (attempt 2) from worker "
                                    f"{held['worker_id']}: its process is gone")
    finally:
        kill(quiet)


def test_profiled_bandwidth_is_read_from_the_profile_the_worker_plans_with(tmp_path, sqlite_url):
    """The planner's JSON profile is the one source: when runs teach it a new disk figure, the
    dashboard shows that figure (there is no copy in the store to go stale)."""
    db = open_store(sqlite_url)
    path = HardwareProfile(host="box", disk_read_gbps=1.5, disk_write_gbps=1.0).save(tmp_path / "profile.json")
    worker = store.register_worker(db, device="cpu", profile_path=str(path))
    new_job(db, "one", rows=4)
    lease = store.claim_shard(db, worker, lease_s=60)
    commit(db, lease, [0, 1], tokens=8)
    bandwidth = read_snapshot(db)["workers"][0]["bandwidth"]
    assert bandwidth["disk_read"] == {"measured_gbps": 0.5, "profiled_gbps": 1.5, "bytes": 1_000_000_000,
                                      "seconds": 2.0}
    HardwareProfile(host="box", disk_read_gbps=0.7, disk_write_gbps=1.0).save(path)  # learned from runs
    assert read_snapshot(db)["workers"][0]["bandwidth"]["disk_read"]["profiled_gbps"] == 0.7
