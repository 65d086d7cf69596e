"""A planned block never exceeds the job's shard: rows beyond the shard would never come, and the
shard's progress would stay at 0 until its one oversized block finished."""
from __future__ import annotations

from engine.planning.hardware import HardwareProfile
from jobrunner import store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.observe.snapshot import read_snapshot
from jobrunner.store.db import open_store
from jobrunner.worker.loop import PlainReporter, Worker, WorkerConfig

# A host with plenty of RAM and fast compute: unbounded, the planner picks blocks far above 6 rows.
ROOMY_HOST = HardwareProfile(host="box", disk_read_gbps=1.1, disk_write_gbps=1.3, cpu_mem_gbps=18.0,
                             matmul_flops={"cpu": {"bfloat16": 4e11, "float32": 2e11}}, cpu_attention_gbps=10.0,
                             cpu_mem_gib=64, disk_free_gib=100)


def test_planned_block_fits_the_shard(tmp_path, tiny_model, prompts_file, offload_dir):
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=tiny_model, params=JobParams(max_new_tokens=2), shard_rows=6).job
    config = WorkerConfig(hardware=ROOMY_HOST, offload_dir=offload_dir, exit_when_idle=True)
    Worker(db, config, reporter=PlainReporter()).run()
    assert store.get_job(db, job.id).done_rows == 12
    (worker,) = read_snapshot(db)["workers"]
    block = worker["policy"]["gpu_batch_size"] * worker["policy"]["num_gpu_batches"]
    assert 1 <= block <= 6
