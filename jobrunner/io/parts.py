"""Result parts: one Parquet table per engine block, stored in the job store.

A part's bytes are written in the same transaction that registers the part and advances the shard
(`store.commit_block`), so a crash leaves either the whole block committed or nothing, and any
machine that reaches the store can read every part. Part names carry the shard's attempt and the
block's index: a retried commit is recognised, and a fenced-off worker's block is never mixed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq

from jobrunner.io.digest import bytes_sha256


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
class ParquetBytes:
    data: bytes
    sha256: str


def part_name(shard_index: int, attempt: int, block_index: int) -> str:
    return f"part-s{shard_index:06d}-a{attempt:03d}-b{block_index:05d}.parquet"


def rows_to_table(rows: list[ResultRow], id_type: pa.DataType | None) -> pa.Table:
    schema = result_schema(id_type)
    columns = {name: [getattr(r, name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def to_parquet_bytes(table: pa.Table) -> ParquetBytes:
    """The table as Parquet bytes, with their sha256 (checked whenever they are read back)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    return ParquetBytes(data=data, sha256=bytes_sha256(data))
