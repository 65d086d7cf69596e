"""Damage to what the job store holds, as a failing disk or a bad copy would leave it: the tests
then check that flexjob detects it by checksum and regenerates the rows, never merging them."""
from __future__ import annotations

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from jobrunner.store.models import Checkpoint, Job, PartData, Shard, ShardInput


def _rewrite_part(db: Engine, part_id: int, change) -> bytes:
    with Session(db) as s, s.begin():
        data = bytes(s.scalar(select(PartData.data).where(PartData.part_id == part_id)))
        s.execute(update(PartData).where(PartData.part_id == part_id).values(data=change(data)))
    return data


def flip_part_byte(db: Engine, part_id: int) -> bytes:
    """Flip one byte in the middle of a part; returns the original bytes."""
    def flip(data: bytes) -> bytes:
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0xFF
        return bytes(damaged)
    return _rewrite_part(db, part_id, flip)


def truncate_part(db: Engine, part_id: int, size: int) -> bytes:
    return _rewrite_part(db, part_id, lambda data: data[:size])


def lose_part(db: Engine, part_id: int) -> None:
    with Session(db) as s, s.begin():
        s.execute(delete(PartData).where(PartData.part_id == part_id))


def flip_shard_input_byte(db: Engine, shard_id: int) -> None:
    with Session(db) as s, s.begin():
        data = bytearray(s.scalar(select(ShardInput.data).where(ShardInput.shard_id == shard_id)))
        data[len(data) // 2] ^= 0xFF
        s.execute(update(ShardInput).where(ShardInput.shard_id == shard_id).values(data=bytes(data)))


def forget_stored_prompts(db: Engine, job_id: int) -> None:
    """Make a job look enqueued by a flexjob that left the prompts in the input file."""
    with Session(db) as s, s.begin():
        shard_ids = select(Shard.id).where(Shard.job_id == job_id)
        s.execute(delete(ShardInput).where(ShardInput.shard_id.in_(shard_ids)))
        s.execute(update(Job).where(Job.id == job_id).values(inputs_in_store=False))


def tamper_checkpoint(db: Engine, shard_id: int) -> None:
    """Change one saved token id, as a bit flip in the stored JSON would."""
    with Session(db) as s, s.begin():
        checkpoint = s.get(Checkpoint, shard_id)
        rows = {r: dict(v) for r, v in checkpoint.rows.items()}
        row = next(r for r, v in rows.items() if v["ids"])
        rows[row]["ids"] = [rows[row]["ids"][0] ^ 1] + rows[row]["ids"][1:]
        checkpoint.rows = rows
