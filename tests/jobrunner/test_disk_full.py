"""The engine's disk tier on a small tmpfs that fills up mid-run: the worker records a disk_full
event, saves its progress, releases the shard and backs off; no row becomes an error row and
nothing half-written is registered; once space is freed the job completes with the output of an
undisturbed run. Needs root (to mount the tmpfs)."""
from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from jobrunner import store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.io.results import write_results
from jobrunner.store import EventKind
from jobrunner.store.db import open_store
from jobrunner.store.models import JobStatus
from tests.support import store_reads
from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, read_results, write_prompts

PARAMS = JobParams(max_new_tokens=24)
CACHE_ON_DISK = ("100", "0", "0", "0", "100", "0")  # weights and activations in memory, KV cache on disk


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "tier"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


class DiskFiller(threading.Thread):
    """Another process's writes: takes every page that comes free (a finished block's cache files
    are deleted, freeing theirs) until stopped, so the disk stays full."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.path = directory / "filler"
        self.stopped = threading.Event()

    def run(self) -> None:
        with open(self.path, "wb", buffering=0) as f:
            while not self.stopped.is_set():
                try:
                    f.write(b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    time.sleep(0.005)

    def free(self) -> None:
        self.stopped.set()
        self.join()
        self.path.unlink()


def wait_for(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_full_disk_tier_pauses_the_worker_and_the_job_completes_when_space_is_freed(
        tmp_path, small_tmpfs, tiny_model, run_worker):
    prompts = write_prompts(tmp_path / "p.parquet", [f"{p} # {i}" for i, p in enumerate(SAMPLE_PROMPTS * 8)])
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    job = enqueue(db, prompts, model_dir=tiny_model, params=PARAMS, shard_rows=12).job
    worker = subprocess.Popen(flexjob_command("work", "--db", url, "--exit-when-idle", "--offload-dir", small_tmpfs,
                                              "--percent", *CACHE_ON_DISK, "--gpu-batch-size", 3),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: store_reads.events(db, job_id=job.id, kinds=[EventKind.BLOCK_COMMITTED]),
                 timeout=240, what="the first committed block")
        filler = DiskFiller(small_tmpfs)
        filler.start()
        [full] = wait_for(lambda: store_reads.events(db, job_id=job.id, kinds=[EventKind.DISK_FULL])[-1:],
                          timeout=120, what="a disk_full event")
        assert full.message.startswith(f"disk full under {small_tmpfs} (")
        assert full.data["directory"] == str(small_tmpfs) and full.data["retry_in_s"] > 0
        assert store.get_job(db, job.id).failed_rows == 0  # the rows are not at fault
        assert worker.poll() is None  # backing off, not crashed
        filler.free()
        output, _ = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
            print(worker.communicate()[0])
    assert worker.returncode == 0, output
    assert "disk full under" in output and "retrying in" in output
    finished = store.get_job(db, job.id)
    assert finished.status == JobStatus.COMPLETED and finished.failed_rows == 0
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    clean = open_store(f"sqlite:///{tmp_path / 'clean.db'}")
    reference = enqueue(clean, prompts, model_dir=tiny_model, params=PARAMS, shard_rows=12).job
    run_worker(clean, block=4)
    assert got == read_results(write_results(clean, reference.id, tmp_path / "clean.parquet").path)
