"""The worker end to end on a generated two-layer OPT: results equal the engine's own output,
row problems become error rows, poison rows are isolated, leases are fenced."""
from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.runtime.engine import Engine
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput
from jobrunner import store
from jobrunner.worker import blocks as worker_blocks
from jobrunner.store.db import open_store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.errors import UserError
from jobrunner.store.models import JobStatus
from jobrunner.io.results import write_results
from jobrunner.store import LeaseLost, PartRecord
from jobrunner.worker.bandwidth_monitor import ReplanDecision
from jobrunner.worker.loop import DeviceLock, PlainReporter, Worker, WorkerConfig
from tests.support.jobs import SAMPLE_PROMPTS, read_results, write_prompts
from jobrunner.store.events import EventKind
from tests.support import store_reads
from tests.support.store_damage import flip_shard_input_byte, forget_stored_prompts

MAX_NEW = 6


def engine_reference(model_dir, offload_dir, prompts: list[str], params: GenerationParams, block: int = 4):
    """The engine called directly, in input order: what the job must reproduce."""
    # The job's dtype (JobParams' default: the machine's fastest), so both sides compute alike.
    with Engine(model_dir, Policy(gpu_batch_size=block), dtype=JobParams().dtype, offload_dir=offload_dir) as engine:
        rows = [RowInput(row_id=i, prompt_ids=tuple(engine.tokenizer(p).input_ids)) for i, p in enumerate(prompts)]
        results = engine.generate(rows, params)
        return [(engine.tokenizer.decode(r.generated_ids, skip_special_tokens=True), len(r.generated_ids),
                 r.finish_reason) for r in results]


def test_results_equal_the_engine_called_directly(tmp_path, tiny_model, offload_dir, prompts_file, run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, id_column="id", shard_rows=5,
                  params=JobParams(max_new_tokens=MAX_NEW)).job
    summary = run_worker(db, block=4)
    assert summary.rows_done == len(SAMPLE_PROMPTS) and summary.stopped_by == "idle"
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    out = write_results(db, job.id, tmp_path / "out.parquet")
    table = pq.read_table(out.path)
    assert table.column("row").to_pylist() == list(range(len(SAMPLE_PROMPTS)))
    assert table.column("id").to_pylist() == [f"p{i}" for i in range(len(SAMPLE_PROMPTS))]
    assert table.column("prompt").to_pylist() == SAMPLE_PROMPTS
    got = list(zip(table.column("completion").to_pylist(), table.column("completion_tokens").to_pylist(),
                   table.column("finish_reason").to_pylist()))
    assert got == engine_reference(tiny_model, offload_dir, SAMPLE_PROMPTS, GenerationParams(max_new_tokens=MAX_NEW))
    assert table.column("error").null_count == len(SAMPLE_PROMPTS)


def test_row_problems_become_error_rows_and_nothing_is_lost(tmp_path, tiny_model, run_worker):
    too_long = "x = 1\n" * 1500  # > 2048 tokens
    values = [b"def f():", None, b"", too_long.encode(), b"\xff\xfe broken", b"import os"]
    path = tmp_path / "bad.parquet"
    # A string column holding invalid UTF-8 (pyarrow writes it unchecked), as files in the wild do.
    pq.write_table(pa.table({"prompt": pa.array(values, pa.binary()).view(pa.string())}), path)
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, path, model_dir=tiny_model, params=JobParams(max_new_tokens=4)).job
    run_worker(db)
    rows = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path).to_pylist()
    assert [r["row"] for r in rows] == list(range(6))
    assert [r["finish_reason"] for r in rows] == ["length", "error", "error", "error", "error", "length"]
    assert rows[1]["error"] == "prompt is null"
    assert rows[2]["error"] == "prompt is empty"
    assert rows[3]["error"].startswith("prompt is too long:") and "2048 positions" in rows[3]["error"]
    assert rows[4]["error"] == "prompt is not valid UTF-8 (byte 0)"
    job = store.get_job(db, job.id)
    assert (job.done_rows, job.failed_rows) == (6, 4)


def test_truncate_left_generates_for_over_long_prompts(tmp_path, tiny_model, run_worker):
    path = write_prompts(tmp_path / "long.parquet", ["x = 1\n" * 1500, "def f():"])
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, path, model_dir=tiny_model, params=JobParams(max_new_tokens=2, truncate="left")).job
    run_worker(db)
    rows = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path).to_pylist()
    assert [r["finish_reason"] for r in rows] == ["length", "length"]
    assert rows[0]["prompt_tokens"] == 2048 - 2


def test_a_poison_row_is_isolated_by_bisection(tmp_path, tiny_model, prompts_file, run_worker, monkeypatch):
    monkeypatch.setenv("FLEXJOB_TEST_POISON_ROW", "6")
    monkeypatch.setattr(worker_blocks, "RETRY_BACKOFF_S", (0.0, 0.0))
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, shard_rows=12, params=JobParams(max_new_tokens=2)).job
    run_worker(db, block=4)
    rows = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path).to_pylist()
    assert [r["row"] for r in rows if r["finish_reason"] == "error"] == [6]
    assert rows[6]["error"] == "engine error: PoisonRowError: test poison row 6"
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    tries = [e for e in store_reads.events(db, job_id=job.id, kinds=[EventKind.ENGINE_ERROR])]
    assert len(tries) >= 3  # retried before bisecting


def test_stop_strings_cut_the_completion(tmp_path, tiny_model, prompts_file, run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    plain = enqueue(db, prompts_file, model_dir=tiny_model, params=JobParams(max_new_tokens=MAX_NEW)).job
    run_worker(db)
    reference = pq.read_table(write_results(db, plain.id, tmp_path / "plain.parquet").path).to_pylist()
    stop = reference[0]["completion"][3:5]  # some text that occurs in row 0's completion
    cut = enqueue(db, prompts_file, model_dir=tiny_model, params=JobParams(max_new_tokens=MAX_NEW, stop=(stop,))).job
    run_worker(db)
    rows = pq.read_table(write_results(db, cut.id, tmp_path / "cut.parquet").path).to_pylist()
    for ref, row in zip(reference, rows):
        if stop in ref["completion"]:
            assert row["completion"] == ref["completion"][:ref["completion"].index(stop)]
            assert row["finish_reason"] == "stop"
        else:
            assert row["completion"] == ref["completion"]
    assert rows[0]["finish_reason"] == "stop"


def test_an_expired_lease_is_taken_over_and_the_late_commit_rejected(tmp_path, tiny_model, prompts_file,
                                                                      run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, shard_rows=12, params=JobParams(max_new_tokens=2)).job
    presumed_dead = store.register_worker(db, device="cpu")
    stale = store.claim_shard(db, presumed_dead, lease_s=0.5)
    time.sleep(0.6)
    run_worker(db)  # takes the shard over and finishes it
    with pytest.raises(LeaseLost):
        store.commit_block(db, stale, PartRecord(path="late.parquet", data=b"", row_ids=(0, 1), failed_rows=0,
                                                 generated_tokens=2, size_bytes=1, sha256="0" * 64,
                                                 block_seconds=0.1))
    rows = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path).column("row").to_pylist()
    assert rows == list(range(12))
    assert [s.attempt for s in store.list_shards(db, job.id)] == [2]
    assert any(e.kind == EventKind.LEASE_EXPIRED for e in store_reads.events(db, job_id=job.id))


def test_the_prompts_live_in_the_store_so_the_input_file_may_change_or_go(tmp_path, tiny_model, prompts_file,
                                                                           run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, id_column="id", shard_rows=4,
                  params=JobParams(max_new_tokens=2)).job
    write_prompts(prompts_file, ["something else entirely"])
    prompts_file.rename(tmp_path / "moved.parquet")
    run_worker(db)
    table = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path)
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    assert table.column("prompt").to_pylist() == SAMPLE_PROMPTS
    assert table.column("id").to_pylist() == [f"p{i}" for i in range(len(SAMPLE_PROMPTS))]


def test_damaged_stored_prompts_fail_the_job_naming_the_shard(tmp_path, tiny_model, prompts_file, run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, shard_rows=4, params=JobParams(max_new_tokens=2)).job
    flip_shard_input_byte(db, store.list_shards(db, job.id)[1].id)
    run_worker(db)
    job = store.get_job(db, job.id)
    assert job.status == JobStatus.FAILED
    assert job.error == f"job {job.id} shard 1: the stored prompts are damaged (checksum mismatch)"


def test_a_job_that_reads_its_input_file_fails_when_the_file_changed(tmp_path, tiny_model, prompts_file, run_worker):
    """Jobs enqueued by an earlier flexjob read their input file, checking its fingerprint."""
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, params=JobParams(max_new_tokens=2)).job
    forget_stored_prompts(db, job.id)
    write_prompts(prompts_file, ["something else entirely"])
    run_worker(db)
    job = store.get_job(db, job.id)
    assert job.status == JobStatus.FAILED
    assert job.error.startswith(f"input file {prompts_file} changed after enqueue")


def test_one_worker_per_device_lock(tmp_path):
    first = DeviceLock("cuda-GPU-test", lock_dir=tmp_path)
    first.acquire()
    with pytest.raises(UserError, match=r"another flexjob worker \(pid \d+\) is using cuda-GPU-test"):
        DeviceLock("cuda-GPU-test", lock_dir=tmp_path).acquire()
    DeviceLock("cuda-GPU-other", lock_dir=tmp_path).acquire()
    first.release()
    DeviceLock("cuda-GPU-test", lock_dir=tmp_path).acquire()


def test_a_cancel_stops_a_running_worker_at_its_next_heartbeat(tmp_path, tiny_model, prompts_file, offload_dir):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, shard_rows=12, params=JobParams(max_new_tokens=200)).job
    config = WorkerConfig(policy=Policy(gpu_batch_size=12), offload_dir=offload_dir, exit_when_idle=True,
                          lease_s=5, heartbeat_s=0.2)
    worker = Worker(db, config, reporter=PlainReporter())
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while store.list_shards(db, job.id)[0].status.value != "leased" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.cancel_job(db, job.id).status == JobStatus.CANCELLING
        started = time.monotonic()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert time.monotonic() - started < 10
    finally:
        worker.stop_signal = worker.stop_signal or 15
        thread.join(timeout=30)
    assert store.get_job(db, job.id).status == JobStatus.CANCELLED
    assert store.list_shards(db, job.id)[0].status.value == "cancelled"


def test_a_replan_is_applied_at_a_block_boundary_and_recorded(tmp_path, tiny_model, prompts_file, run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, shard_rows=12, params=JobParams(max_new_tokens=2)).job
    calls = []

    def replanner(engine):
        calls.append(engine.policy.gpu_batch_size)
        if len(calls) > 1:
            return None
        return ReplanDecision(block_index=0, old_policy=engine.policy, new_policy=Policy(gpu_batch_size=6),
                              profiled_gbps={"disk_read": 1.0}, measured_gbps={"disk_read": 0.5},
                              drifted_links=("disk_read",), old_tokens_per_s=10.0, new_tokens_per_s=15.0, apply=True)

    config = WorkerConfig(policy=Policy(gpu_batch_size=3), offload_dir=tmp_path / "off", exit_when_idle=True)
    Worker(db, config, reporter=PlainReporter(), replanner=replanner).run()
    assert calls == [3, 6]  # asked before each block: switched before the first, kept for the second
    [event] = store_reads.events(db, job_id=job.id, kinds=[EventKind.REPLAN])
    assert event.message == "3x1 [100 0 100 0 100 0] overlap -> 6x1 [100 0 100 0 100 0] overlap"
    assert event.data["measured_gbps"] == {"disk_read": 0.5} and event.data["predicted_gain"] == 0.5
    assert len(store.job_parts(db, job.id)) == 2  # 12 rows in blocks of 6
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED


@pytest.mark.postgres
def test_the_whole_path_on_postgresql(tmp_path, tiny_model, prompts_file, pg_url, run_worker):
    db = open_store(pg_url)
    job = enqueue(db, prompts_file, model_dir=tiny_model, shard_rows=5, params=JobParams(max_new_tokens=3)).job
    run_worker(db, block=4)
    rows = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path).column("row").to_pylist()
    assert rows == list(range(len(SAMPLE_PROMPTS)))
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED


def streamed_model(tmp_path, tiny_model):
    """A 4-layer model of 6 MB per layer (disk reads big enough to time) with the tiny model's tokenizer."""
    import shutil

    from engine.model.config import preset
    from engine.model.synthetic import make_model

    model = tmp_path / "model"
    make_model(preset("125m", num_layers=4, hidden_size=512), model, with_tokenizer=False)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, model / f.name)
    return model


@pytest.mark.slow
def test_the_worker_teaches_the_stored_profile_the_disk_bandwidth_its_blocks_saw(tmp_path, tiny_model,
                                                                                monkeypatch):
    """The engine only measures; the worker hands each finished block to the profile store, which
    blends the disk read bandwidth the blocks saw into the profile stored for the disk directory."""
    from engine.planning.hardware import HardwareProfile
    from engine.planning.profile_store import profile_path

    monkeypatch.setenv("FLEXJOB_HOME", str(tmp_path / "home"))
    model = streamed_model(tmp_path, tiny_model)
    path = HardwareProfile(host="test", disk_read_gbps=1000.0, disk_write_gbps=1000.0).save(
        profile_path(tmp_path / "off"))
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    prompts = write_prompts(tmp_path / "p.parquet", SAMPLE_PROMPTS[:4])
    enqueue(db, prompts, model_dir=model, params=JobParams(max_new_tokens=16))
    config = WorkerConfig(policy=Policy.from_percents([0, 50, 0, 100, 0, 100], gpu_batch_size=2),
                          offload_dir=tmp_path / "off", exit_when_idle=True)
    Worker(db, config, reporter=PlainReporter()).run()
    learned = HardwareProfile.load(path)
    assert learned.learned_blocks == 2 and learned.disk_read_gbps < 1000  # two blocks of two rows
    assert learned.probed_gbps == {"disk_read_gbps": 1000.0}


@pytest.mark.slow
def test_a_throttled_disk_makes_the_worker_replan_and_output_stays_the_same(tmp_path, tiny_model, run_worker):
    """The real bandwidth monitor behind the worker: the disk delivers a quarter of the profiled
    bandwidth, the LP is re-solved, the new policy is applied at a block boundary and recorded."""
    from engine.planning.hardware import HardwareProfile
    from engine.runtime.tiers import DISK_READ
    from jobrunner.worker.replan import ProfileReplanner

    model = streamed_model(tmp_path, tiny_model)
    hardware = HardwareProfile(disk_read_gbps=0.2, disk_write_gbps=1.3, cpu_mem_gbps=18.0,
                               matmul_flops={"cpu": {"bfloat16": 4e11}}, cpu_attention_gbps=10.0,
                               dequant_gbps=5.0, cpu_mem_gib=23, disk_free_gib=100)
    start = Policy.from_percents([0, 50, 0, 100, 0, 100], gpu_batch_size=2)
    prompts = write_prompts(tmp_path / "p.parquet", SAMPLE_PROMPTS[:10])
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    params = JobParams(max_new_tokens=4)
    job = enqueue(db, prompts, model_dir=model, params=params).job
    replanner = ProfileReplanner(hardware, gpu_mem_gib=None, cpu_mem_gib=8, gen_len=4,
                                 plan_kwargs=dict(gpu_batch_sizes=(2,), num_gpu_batches=(1,), compress_options=(False,)))
    config = WorkerConfig(policy=start, cpu_mem_gib=8, offload_dir=tmp_path / "off", exit_when_idle=True,
                          throttle_gbps={DISK_READ: 0.05})
    Worker(db, config, reporter=PlainReporter(), replanner=replanner).run()
    [event] = store_reads.events(db, job_id=job.id, kinds=[EventKind.REPLAN])
    assert event.data["measured_gbps"][DISK_READ] < 0.07 and event.data["profiled_gbps"][DISK_READ] == 0.2
    assert event.data["new_policy"]["weights_cpu_percent"] > start.weights_cpu_percent
    replanned = read_results(write_results(db, job.id, tmp_path / "a.parquet").path)
    plain = enqueue(db, prompts, model_dir=model, params=params, force=True).job
    Worker(db, WorkerConfig(policy=start, offload_dir=tmp_path / "off", exit_when_idle=True),
           reporter=PlainReporter()).run()
    assert read_results(write_results(db, plain.id, tmp_path / "b.parquet").path) == replanned


def test_max_jobs_stops_the_worker_before_a_new_job(tmp_path, tiny_model, prompts_file, run_worker):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    first = enqueue(db, prompts_file, model_dir=tiny_model, params=JobParams(max_new_tokens=1)).job
    second = enqueue(db, prompts_file, model_dir=tiny_model, params=JobParams(max_new_tokens=2)).job
    summary = run_worker(db, block=12, max_jobs=1)
    assert summary.stopped_by == "max-jobs"
    assert store.get_job(db, first.id).status == JobStatus.COMPLETED
    assert store.get_job(db, second.id).status == JobStatus.QUEUED  # claimed once, handed back untouched
    assert [s.status.value for s in store.list_shards(db, second.id)] == ["pending"]
    assert run_worker(db, block=12).rows_done == len(SAMPLE_PROMPTS)
