"""A worker in another process for takeover tests: it registers, claims one shard, prints its
lease as JSON and sleeps until it is killed (a real process whose death the store must notice)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

# The holder: registers as a worker of this host (or, with a host id, of another machine),
# claims one shard (its last heartbeat `ago` seconds back), prints its lease, sleeps until killed.
HOLDER = """
import json, os, sys, time
from datetime import timedelta
from jobrunner import store
from jobrunner.store.db import open_store
from jobrunner.store.models import utcnow
from jobrunner.worker.liveness import host_id, process_start_time
db = open_store(sys.argv[1])
wid = store.register_worker(db, device="cpu", host_id=sys.argv[3] or host_id(),
                            process_started_at=process_start_time(os.getpid()))
lease = store.claim_shard(db, wid, lease_s=float(sys.argv[2]), now=utcnow() - timedelta(seconds=float(sys.argv[4])))
print(json.dumps({"worker_id": wid, "shard_id": lease.shard_id, "job_id": lease.job_id, "attempt": lease.attempt,
                  "shard_index": lease.shard_index, "row_start": lease.row_start, "row_end": lease.row_end}),
      flush=True)
time.sleep(600)
"""


def start_holder(url: str, *, lease_s: float = 60.0, host_id: str = "",
                 ago_s: float = 0.0) -> tuple[subprocess.Popen, dict]:
    """A holder with a `lease_s` lease whose last heartbeat was `ago_s` seconds ago; with `host_id`,
    a worker of another machine (its pid means nothing here)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(lease_s), host_id, str(ago_s)],
                            stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    line = proc.stdout.readline()
    assert line, f"the holder exited with {proc.wait()}"
    return proc, json.loads(line)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
