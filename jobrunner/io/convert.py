"""JSONL and CSV inputs, turned into the Parquet file the workers read by row range.

Workers read rows by range from a Parquet file (row groups make that cheap); a JSONL or CSV file
has no such index, so `enqueue` streams it once into Parquet (in batches: memory stays bounded
whatever the file size) and the job points at that copy. The copy's name is derived from the
source's sha256 and the options, so enqueueing the same file again finds it instead of writing it
twice.

JSONL lines are either OpenAI Batch API requests (jobrunner.io.openai_batch; the prompt is
`body.prompt`, the id is `custom_id`) or plain objects with a prompt field (`--column`). A line
that is not JSON, or whose prompt is not text, is refused with its number: it is a malformed file,
not a row that could be answered. A null prompt, or an empty one, becomes an error row as in
Parquet inputs. Ids are written as text.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jobrunner.errors import UserError
from jobrunner.io.openai_batch import ParameterCheck, is_batch_request, parse_request

BATCH_ROWS = 8192
PROMPT = "prompt"
ID = "id"
CONVERTED_SCHEMA = pa.schema([pa.field(PROMPT, pa.string()), pa.field(ID, pa.string())])


@dataclass(frozen=True, kw_only=True)
class ConvertedInput:
    path: Path                       # the Parquet copy (columns prompt, id)
    id_column: str | None            # "id" when the source has ids, else None
    params: dict[str, Any] = field(default_factory=dict)  # JobParams fields an OpenAI file sets
    model: str | None = None         # body.model of an OpenAI file


def input_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "parquet"


@dataclass
class _Seen:
    """What the row reader learns while streaming: whether rows have ids, an OpenAI file's settings."""
    has_ids: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None


def convert_input(source: Path, out_dir: Path, *, column: str,
                  id_column: str | None, limit: int | None) -> ConvertedInput:
    """Write the Parquet copy of a JSONL/CSV file into `out_dir`; at most `limit` rows."""
    dest = out_dir / "input.parquet"
    seen = _Seen()
    reader = _jsonl_rows if input_kind(source) == "jsonl" else _csv_rows
    out_dir.mkdir(parents=True, exist_ok=True)
    if _write_parquet(dest, reader(source, column, id_column, seen), limit) == 0:
        dest.unlink()
        raise UserError(f"{source}: the file has 0 rows", "there is nothing to generate")
    return ConvertedInput(path=dest, id_column=ID if seen.has_ids else None, params=dict(seen.params),
                          model=seen.model)


def _write_parquet(dest: Path, rows: Iterator[tuple[str | None, str | None]], limit: int | None) -> int:
    """Stream rows into `dest` atomically; returns the row count."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with pq.ParquetWriter(tmp, CONVERTED_SCHEMA) as writer:
            batch: list[tuple[str | None, str | None]] = []
            for row in rows:
                if limit is not None and count >= limit:
                    break
                batch.append(row)
                count += 1
                if len(batch) == BATCH_ROWS:
                    writer.write_table(_table(batch))
                    batch = []
            if batch:
                writer.write_table(_table(batch))
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def _table(batch: list[tuple[str | None, str | None]]) -> pa.Table:
    return pa.table({PROMPT: [p for p, _ in batch], ID: [i for _, i in batch]}, schema=CONVERTED_SCHEMA)


def _jsonl_rows(path: Path, column: str, id_column: str | None, seen: _Seen) -> Iterator[tuple]:
    """(prompt, id) per non-blank line; OpenAI batch requests or plain objects, decided by line 1."""
    check = ParameterCheck(path)
    batch_format: bool | None = None
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, text in enumerate(_lines(f, path), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: not valid JSON ({exc.msg})",
                                "each line must be one JSON object") from None
            if batch_format is None:
                batch_format = is_batch_request(record)
            if batch_format:
                request = parse_request(record, path=path, line=number)
                check.check(request)
                seen.has_ids, seen.params, seen.model = True, check.first.params, check.first.model
                yield request.prompt, request.custom_id
            else:
                yield _plain_row(record, path, number, column, id_column, seen)


def _lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start} of a block)",
                        "JSONL files must be UTF-8") from None


def _plain_row(record: object, path: Path, number: int, column: str, id_column: str | None,
               seen: _Seen) -> tuple[str | None, str | None]:
    if not isinstance(record, dict) or column not in record:
        raise UserError(f"{path} line {number}: no {column!r} field",
                        "each line needs the prompt field (pick it with --column), or use the OpenAI batch format")
    prompt = record[column]
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"{path} line {number}: {column!r} must be a string, got {type(prompt).__name__}",
                        "one text prompt per line")
    if id_column is None:
        return prompt, None
    if id_column not in record:
        raise UserError(f"{path} line {number}: no {id_column!r} field", "drop --id-column or add the field")
    seen.has_ids = True
    value = record[id_column]
    return prompt, None if value is None else str(value)


def _csv_rows(path: Path, column: str, id_column: str | None, seen: _Seen) -> Iterator[tuple]:
    """(prompt, id) per CSV record, read in blocks; the prompt and id columns are read as text."""
    names = [column] + ([id_column] if id_column else [])
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in names}, include_columns=names)
    try:
        reader = pacsv.open_csv(path, convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
        raise UserError(f"{path}: cannot read as CSV with a {column!r} column ({exc})",
                        "the first line must name the columns; pick the prompt column with --column") from None
    seen.has_ids = id_column is not None
    for batch in _csv_batches(reader, path):
        prompts = batch.column(column).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column else [None] * len(prompts)
        yield from zip(prompts, ids)


def _csv_batches(reader, path: Path) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise UserError(f"{path}: malformed CSV ({exc})", "check the quoting of that line") from None
