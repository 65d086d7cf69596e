"""The file `flexjob results` writes, chosen by its extension: Parquet, CSV, or JSONL in the
OpenAI Batch API output format.

Every writer takes the merged result tables shard by shard (input order) and streams them out,
so memory stays bounded by one shard whatever the format. The output path is checked before any
work: an existing file is kept unless `force`, and a missing parent directory is refused rather
than created (a typo in a path should not grow a directory tree).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jobrunner.errors import UserError
from jobrunner.io.openai_batch import batch_output_lines

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


class TableWriter(Protocol):
    """Takes the result tables in input order; close() may be called more than once."""

    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class OutputContext:
    """What the JSONL (OpenAI batch) format needs besides the rows."""
    job_id: int
    model: str


def output_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"output {path}: unknown extension {path.suffix or '(none)'!r}",
                        "name the file .parquet, .csv or .jsonl (OpenAI batch output format)")
    return fmt


def check_output_path(path: Path, *, force: bool) -> str:
    """The output format of `path`, after refusing a directory, an existing file (without
    `force`) and a parent directory that does not exist."""
    if path.is_dir():
        raise UserError(f"output {path} is a directory", "pass a file name such as out.parquet")
    fmt = output_format(path)
    if path.exists() and not force:
        raise UserError(f"output {path} already exists", "pass --force to overwrite it, or choose another name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist", "create it first, or choose another path")
    return fmt


class _ArrowOut:
    """Parquet or CSV through pyarrow's streaming writers (both take a path and the first table's schema)."""

    def __init__(self, path: Path, make: Callable) -> None:
        self.path = path
        self.make = make
        self.writer = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = self.make(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _BatchJsonlOut:
    def __init__(self, path: Path, context: OutputContext) -> None:
        self.file = open(path, "w", encoding="utf-8")
        self.context = context

    def write(self, table: pa.Table) -> None:
        for line in batch_output_lines(table.to_pylist(), job_id=self.context.job_id, model=self.context.model):
            self.file.write(line + "\n")

    def close(self) -> None:
        self.file.close()  # a closed file ignores a second close


def open_writer(fmt: str, path: Path, context: OutputContext) -> TableWriter:
    if fmt == "parquet":
        return _ArrowOut(path, pq.ParquetWriter)
    if fmt == "csv":
        return _ArrowOut(path, pacsv.CSVWriter)
    return _BatchJsonlOut(path, context)
