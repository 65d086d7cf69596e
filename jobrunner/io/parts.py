"""Result parts: one Parquet file per engine block, written atomically.

A part is written to a temporary name, fsynced, renamed into place, and the directory fsynced, so
after a crash a part either exists whole or not at all. Only then is it registered in the store
(`store.commit_block`); a part on disk that was never registered is ignored by `results`, which
is what makes a crash between write and commit harmless. Part names carry the shard's attempt, so
a worker whose lease was taken over never overwrites its successor's files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from jobrunner.io.digest import file_sha256


def result_schema(id_type: pa.DataType | None) -> pa.Schema:
    """Columns of every part and of the merged results file."""
    fields = [pa.field("row", pa.int64(), nullable=False)]
    if id_type is not None:
        fields.append(pa.field("id", id_type))
    fields += [
        pa.field("prompt", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),  # stop | length | error
        pa.field("error", pa.string()),           # null unless finish_reason is error
        pa.field("attempt", pa.int32()),          # the shard attempt that produced the row
        pa.field("block_seconds", pa.float64()),  # wall time of the engine block the row was in
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
    return pa.schema(fields)


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    row: int
    id: object | None
    prompt: str | None
    completion: str | None
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    error: str | None
    attempt: int
    block_seconds: float
    finished_at: datetime


@dataclass(frozen=True, kw_only=True)
class WrittenPart:
    path: Path
    size_bytes: int
    sha256: str


def part_name(shard_index: int, attempt: int, block_index: int) -> str:
    return f"part-s{shard_index:06d}-a{attempt:03d}-b{block_index:05d}.parquet"


def rows_to_table(rows: list[ResultRow], id_type: pa.DataType | None) -> pa.Table:
    schema = result_schema(id_type)
    columns = {name: [getattr(r, name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(table: pa.Table, path: Path, *, before_rename: Callable[[], None] | None = None) -> WrittenPart:
    """Write `table` to `path` atomically and durably; returns its size and sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    sha256 = file_sha256(tmp, fsync=True)
    if before_rename is not None:
        before_rename()  # test hook: a crash with the temp file written but not yet in place
    size = tmp.stat().st_size
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return WrittenPart(path=path, size_bytes=size, sha256=sha256)
