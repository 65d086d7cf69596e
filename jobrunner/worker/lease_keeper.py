"""The heartbeat thread that keeps a worker's lease on a shard alive while the shard runs."""
from __future__ import annotations

import threading
import time

from sqlalchemy import Engine as StoreEngine

from jobrunner import store
from jobrunner.store import Lease, LeaseLost
from jobrunner.store.models import JobStatus


class LeaseKeeper(threading.Thread):
    """Renews a lease every heartbeat; notices a cancel or a takeover and raises a flag."""

    def __init__(self, db: StoreEngine, lease: Lease, *, lease_s: float, interval_s: float) -> None:
        super().__init__(name="flexjob-heartbeat", daemon=True)
        self.db, self.lease, self.lease_s, self.interval_s = db, lease, lease_s, interval_s
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self._halt = threading.Event()
        self._valid_until = time.monotonic() + lease_s

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                status = store.heartbeat(self.db, self.lease, lease_s=self.lease_s)
                self._valid_until = time.monotonic() + self.lease_s
                if status in (JobStatus.CANCELLING, JobStatus.CANCELLED):
                    self.cancelled.set()
            except LeaseLost:
                self.lost.set()
                return
            except Exception:  # noqa: BLE001 - the database is unreachable: keep trying until the lease runs out
                if time.monotonic() > self._valid_until:
                    self.lost.set()
                    return

    def interrupted(self) -> bool:
        """The shard must stop: its lease was taken over or its job cancelled."""
        return self.lost.is_set() or self.cancelled.is_set()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
