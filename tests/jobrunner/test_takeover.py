"""Taking over the shards of a dead worker: at once when its process is certainly gone (same host:
pid absent, or reused), after the lease expires otherwise; fenced either way. Real processes (a
holder that registers and claims, then is SIGKILLed), a real SQLite file, and PostgreSQL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from jobrunner import store
from jobrunner.store import EventKind, Lease, LeaseLost
from jobrunner.store.db import open_store
from jobrunner.store.models import ShardStatus, WorkerStatus, utcnow
from jobrunner.worker.liveness import process_gone, process_start_time, take_over_dead
from tests.jobrunner.test_store import new_job, part_for
from tests.support import store_reads

# A holder process: registers as a worker of this host (or, with a host id, of another machine),
# claims one shard, prints its lease and sleeps until it is killed.
HOLDER = """
import json, os, sys, time
from jobrunner import store
from jobrunner.store.db import open_store
from jobrunner.worker.liveness import host_id, process_start_time
db = open_store(sys.argv[1])
wid = store.register_worker(db, device="cpu", host_id=sys.argv[3] or host_id(),
                            process_started_at=process_start_time(os.getpid()))
lease = store.claim_shard(db, wid, lease_s=float(sys.argv[2]))
print(json.dumps({"worker_id": wid, "shard_id": lease.shard_id, "job_id": lease.job_id, "attempt": lease.attempt,
                  "shard_index": lease.shard_index, "row_start": lease.row_start, "row_end": lease.row_end}),
      flush=True)
time.sleep(600)
"""


def start_holder(url: str, *, lease_s: float = 60.0, host_id: str = "") -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(lease_s), host_id], stdout=subprocess.PIPE,
                            text=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    line = proc.stdout.readline()
    assert line, f"the holder exited with {proc.wait()}"
    return proc, json.loads(line)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def lease_of(held: dict) -> Lease:
    return Lease(shard_id=held["shard_id"], job_id=held["job_id"], shard_index=held["shard_index"],
                 attempt=held["attempt"], worker_id=held["worker_id"], row_start=held["row_start"],
                 row_end=held["row_end"], expires_at=utcnow())


def test_a_killed_holder_on_this_host_is_taken_over_at_once_and_fenced(any_db_url):
    url = any_db_url
    db = open_store(url)
    store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    proc, held = start_holder(url, lease_s=60)
    me = store.register_worker(db, device="cpu")
    assert store.claim_shard(db, me, lease_s=60) is None  # alive: its lease stands
    assert take_over_dead(db, me) == []
    kill(proc)
    [(dead, freed)] = take_over_dead(db, me)
    assert dead.id == held["worker_id"] and freed == [held["shard_id"]]  # a 60 s lease, taken at once
    lease = store.claim_shard(db, me, lease_s=60)
    assert lease is not None and lease.took_over and lease.attempt == held["attempt"] + 1
    with pytest.raises(LeaseLost):  # the dead holder's commit, were it to come, is refused
        store.commit_block(db, lease_of(held), part_for(lease_of(held), list(range(held["row_start"], held["row_end"]))))
    assert store.commit_block(db, lease, part_for(lease, list(range(lease.row_start, lease.row_end)))) is True
    [dead] = [w for w in store_reads.workers(db) if w.id == held["worker_id"]]
    assert dead.status == WorkerStatus.DEAD
    [event] = store_reads.events(db, kinds=[EventKind.WORKER_DEAD])
    assert event.worker_id == me and event.data["previous_worker"] == held["worker_id"]
    assert f"took over shard 0 (attempt 2) from worker {held['worker_id']}: its process is gone" == event.message
    [ended] = [e for e in store_reads.events(db, kinds=[EventKind.WORKER_STOPPED]) if e.worker_id == held["worker_id"]]
    assert ended.data["dead"] and ended.data["shards"] == [{"job_id": 1, "shard_index": 0, "attempt": 1}]


def test_a_holder_on_another_machine_waits_for_its_lease(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    proc, held = start_holder(url, lease_s=2, host_id="another-machine/pid:[1]")
    kill(proc)  # its pid is gone here, but the pid named a process of another machine
    me = store.register_worker(db, device="cpu")
    assert take_over_dead(db, me) == []
    assert store.claim_shard(db, me, lease_s=60) is None
    lease = store.claim_shard(db, me, lease_s=60, now=utcnow() + timedelta(seconds=3))
    assert lease is not None and lease.took_over
    [event] = store_reads.events(db, kinds=[EventKind.LEASE_EXPIRED])
    assert "its lease ran out" in event.message and not event.data["holder_dead"]


def test_a_reused_pid_and_a_zombie_count_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_start_time(proc.pid)
        assert started is not None and not process_gone(proc.pid, started)
        assert process_gone(proc.pid, started - 5.0)  # the pid now names a process that started later
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_start_time(proc.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # killed, not reaped yet: a zombie
        assert process_gone(proc.pid, started)
    finally:
        proc.kill()
        proc.wait()
    assert process_gone(proc.pid, started)
