"""The input Parquet: validation, fingerprint, and reading rows by range without loading the file.

File-level problems (missing, not Parquet, no rows, no such column, not text) are refused at
enqueue with one line naming the file. Row-level problems (null, empty, not UTF-8) are not errors
here: `read_rows` returns them as `InputRow.problem`, and the worker turns them into error rows,
so a bad row never fails a job and is never lost.

Prompts are read as bytes and decoded row by row: a string column can hold invalid UTF-8 (pyarrow
writes it unchecked), and decoding the whole column at once would fail for every row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobrunner.errors import UserError
from jobrunner.io.digest import file_sha256

SCAN_BATCH_ROWS = 8192


@dataclass(frozen=True, kw_only=True)
class InputInfo:
    path: Path
    num_rows: int
    num_row_groups: int
    prompt_type: str
    id_type: pa.DataType | None
    size: int
    mtime_ns: int


@dataclass(frozen=True, kw_only=True)
class InputRow:
    row: int                  # position in the input file (0-based): the row's identity everywhere
    id: object | None         # value of --id-column, if given
    prompt: str | None        # None when null or not UTF-8
    problem: str | None = None  # why the row cannot be generated (it becomes an error row)


def _is_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or _is_view(t))


def _is_view(t: pa.DataType) -> bool:
    return getattr(pa.types, "is_string_view", lambda _t: False)(t) or \
        getattr(pa.types, "is_binary_view", lambda _t: False)(t)


def open_parquet(path: str | Path) -> pq.ParquetFile:
    path = Path(path)
    if not path.exists():
        raise UserError(f"input file {path} does not exist", "check the path")
    if path.is_dir():
        raise UserError(f"input {path} is a directory, not a Parquet file",
                        "pass one .parquet file (merge a dataset directory first)")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"input file {path} is not a readable Parquet file ({exc})",
                        "write prompts with pyarrow.parquet.write_table or pandas.DataFrame.to_parquet"
                        ) from None


def inspect_input(path: str | Path, column: str, id_column: str | None = None) -> InputInfo:
    """Validate the file and its columns from the footer alone (no data pages are read)."""
    path = Path(path)
    pf = open_parquet(path)
    schema = pf.schema_arrow
    names = schema.names
    if column not in names:
        raise UserError(f"{path}: column {column!r} not found (columns: {', '.join(names)})",
                        "pick the prompt column with --column")
    prompt_type = schema.field(column).type
    if not _is_text(prompt_type):
        raise UserError(f"{path}: column {column!r} has type {prompt_type}, not a string type",
                        "the prompt column must hold text (string or UTF-8 binary)")
    id_type = None
    if id_column is not None:
        if id_column not in names:
            raise UserError(f"{path}: id column {id_column!r} not found (columns: {', '.join(names)})",
                            "drop --id-column or name an existing column")
        id_type = schema.field(id_column).type
    num_rows = pf.metadata.num_rows
    if num_rows == 0:
        raise UserError(f"{path}: the file has 0 rows", "there is nothing to generate")
    stat = path.stat()
    return InputInfo(path=path.resolve(), num_rows=num_rows, num_row_groups=pf.num_row_groups,
                     prompt_type=str(prompt_type), id_type=id_type, size=stat.st_size,
                     mtime_ns=stat.st_mtime_ns)


def fingerprint_file(path: str | Path) -> str:
    """sha256 of the file's bytes, read in 1 MiB chunks (bounded memory for any size)."""
    return file_sha256(path)


def prompt_problem(value: bytes | None) -> tuple[str | None, str | None]:
    """(prompt, problem): the decoded text (None if it has none) and what makes it unusable."""
    if value is None:
        return None, "prompt is null"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"prompt is not valid UTF-8 (byte {exc.start})"
    if text == "":
        return "", "prompt is empty"
    return text, None


def as_binary(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The text column's raw bytes, without decoding (zero-copy for string and large_string)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    t = array.type
    if pa.types.is_string(t):
        return array.view(pa.binary())
    if pa.types.is_large_string(t):
        return array.view(pa.large_binary())
    if _is_view(t):
        return array.cast(pa.large_binary())
    return array


def _as_bytes(array: pa.Array | pa.ChunkedArray) -> list[bytes | None]:
    return as_binary(array).to_pylist()


def count_problem_rows(path: str | Path, column: str, limit: int | None = None) -> dict[str, int]:
    """Stream the prompt column (row group by row group, in batches so that the Python objects of
    a whole large row group never exist at once) and count rows (the first `limit`) that will be
    error rows. Reading every data page here also finds a damaged file before any worker does."""
    pf = open_parquet(path)
    counts: dict[str, int] = {}
    try:
        _count_problems(pf, column, limit, counts)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"input file {path} is damaged: {exc}".replace("\n", " "),
                        "write the file again (pyarrow.parquet.write_table or pandas.DataFrame.to_parquet)"
                        ) from None
    return counts


def _count_problems(pf: pq.ParquetFile, column: str, limit: int | None, counts: dict[str, int]) -> None:
    pool = pa.default_memory_pool()
    seen = 0
    for index, batch in enumerate(pf.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=[column])):
        if limit is not None and seen >= limit:
            break
        seen += batch.num_rows
        if limit is not None and seen > limit:
            batch = batch.slice(0, batch.num_rows - (seen - limit))
        if index % 8 == 7:
            # mimalloc keeps freed row-group buffers and RSS creeps up with the file size; hand
            # them back so that enqueue's memory is bounded by one row group.
            pool.release_unused()
        for value in _as_bytes(batch.column(0)):
            _, problem = prompt_problem(value)
            if problem:
                kind = problem.split(" (")[0]
                counts[kind] = counts.get(kind, 0) + 1


def read_rows(path: str | Path, column: str, id_column: str | None, start: int, end: int) -> list[InputRow]:
    """Rows [start, end) of the file, reading only the row groups that overlap the range."""
    pf = open_parquet(path)
    columns = [column] + ([id_column] if id_column else [])
    rows: list[InputRow] = []
    group_start = 0
    for i in range(pf.num_row_groups):
        group_rows = pf.metadata.row_group(i).num_rows
        group_end = group_start + group_rows
        if group_end > start and group_start < end:
            table = pf.read_row_group(i, columns=columns)
            lo, hi = max(start, group_start) - group_start, min(end, group_end) - group_start
            table = table.slice(lo, hi - lo)
            prompts = _as_bytes(table.column(column))
            ids = table.column(id_column).to_pylist() if id_column else [None] * len(prompts)
            for offset, (value, row_id_value) in enumerate(zip(prompts, ids)):
                prompt, problem = prompt_problem(value)
                rows.append(InputRow(row=group_start + lo + offset, id=row_id_value, prompt=prompt,
                                     problem=problem))
        group_start = group_end
        if group_start >= end:
            break
    if len(rows) != end - start:
        raise UserError(f"{path}: expected rows {start}..{end - 1} but the file has {group_start} rows "
                        f"(it changed after enqueue)", "restore the file, or enqueue the new one")
    return rows
