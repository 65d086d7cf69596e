"""A shard's prompts as Parquet bytes in the job store: cut from the input file at enqueue, read
back by whichever worker claims the shard (on any machine) without the input file.

Each shard's table has a `prompt` column of the raw bytes (so a value that is not valid UTF-8
stays a row problem for the worker, as in the input file) and, with an id column, `id` in its
own type. Enqueue streams the file in batches, so its memory is bounded by a shard plus a batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from jobrunner.errors import UserError
from jobrunner.io.digest import bytes_sha256
from jobrunner.io.inputs import SCAN_BATCH_ROWS, InputRow, as_binary, open_parquet, prompt_problem
from jobrunner.io.parts import ParquetBytes, to_parquet_bytes


def _shard_table(table: pa.Table, id_column: str | None) -> pa.Table:
    columns = {"prompt": as_binary(table.column(0))}
    if id_column is not None:
        columns["id"] = table.column(1)
    return pa.table(columns)


def cut_shards(path: str | Path, column: str, id_column: str | None, *, shard_rows: int,
               total_rows: int) -> Iterator[ParquetBytes]:
    """The first `total_rows` rows of the file, `shard_rows` at a time, as Parquet bytes."""
    pf = open_parquet(path)
    columns = [column] + ([id_column] if id_column else [])
    pending: list[pa.RecordBatch] = []
    pending_rows = emitted = 0
    batches = pf.iter_batches(batch_size=max(SCAN_BATCH_ROWS, shard_rows), columns=columns)
    while emitted < total_rows:
        want = min(shard_rows, total_rows - emitted)
        while pending_rows < want:
            batch = next(batches)
            pending.append(batch)
            pending_rows += batch.num_rows
        table = pa.Table.from_batches(pending)
        yield to_parquet_bytes(_shard_table(table.slice(0, want), id_column))
        rest = table.slice(want)
        pending, pending_rows = rest.to_batches(), rest.num_rows
        emitted += want


def read_shard_rows(data: bytes, sha256: str, *, row_start: int, row_end: int, where: str) -> list[InputRow]:
    """The shard's rows from its stored bytes; a damaged copy is refused, naming `where`."""
    if bytes_sha256(data) != sha256:
        raise UserError(f"{where}: the stored prompts are damaged (checksum mismatch)",
                        "enqueue the input file again")
    table = pq.read_table(pa.BufferReader(data))
    if table.num_rows != row_end - row_start:
        raise UserError(f"{where}: the stored prompts hold {table.num_rows} rows, expected {row_end - row_start}",
                        "enqueue the input file again")
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
    rows = []
    for offset, (value, row_id) in enumerate(zip(table.column("prompt").to_pylist(), ids)):
        prompt, problem = prompt_problem(value)
        rows.append(InputRow(row=row_start + offset, id=row_id, prompt=prompt, problem=problem))
    return rows


def id_type_of(data: bytes) -> pa.DataType | None:
    """The id column's type in a shard's stored bytes (read from the footer), None without ids."""
    schema = pq.read_schema(pa.BufferReader(data))
    return schema.field("id").type if "id" in schema.names else None
