"""`flexjob results`: merge a job's parts into one file in input order, checking every row once.

The file's format follows its extension (jobrunner.io.output_formats): Parquet, CSV, or JSONL in
the OpenAI Batch API output format.

Parts are read from the store shard by shard (shards are contiguous row ranges in input order;
inside a shard the blocks were sorted by length), so memory is bounded by one shard, not by the
job. Each part is checked against the size and sha256 recorded when it was committed: a missing or
damaged part is named, and `flexjob retry JOB` regenerates exactly its rows.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine

from jobrunner import store
from jobrunner.errors import UserError
from jobrunner.store.models import Job, JobStatus, ResultPart
from jobrunner.io.output_formats import OutputContext, check_output_path, open_writer
from jobrunner.io.digest import bytes_sha256


@dataclass(frozen=True, kw_only=True)
class ResultsSummary:
    path: Path
    rows: int
    missing_rows: int
    error_rows: int
    finish_reasons: dict[str, int]


def _part_bytes(engine: Engine, job: Job, part: ResultPart) -> tuple[bytes | None, str]:
    """(the part's bytes or None if they are missing, where they are): from the store, or, for a
    part registered as a file by an earlier flexjob (its job has a results_dir), from that file."""
    data = store.part_bytes(engine, part.id)
    if data is not None or not job.results_dir:
        return data, f"result part {part.path}"
    path = Path(job.results_dir) / part.path
    return (path.read_bytes() if path.is_file() else None), f"result part {path}"


def part_problem(part: ResultPart, data: bytes | None, where: str) -> str | None:
    """Why a registered part cannot be used, or None if it is intact."""
    if data is None:
        return f"{where} is missing"
    if len(data) != part.size_bytes:
        return f"{where} is corrupt (size {len(data)}, expected {part.size_bytes})"
    if bytes_sha256(data) != part.sha256:
        return f"{where} is corrupt (checksum mismatch)"
    return None


def damaged_parts(engine: Engine, job_id: int) -> list[tuple[ResultPart, str]]:
    job = store.get_job(engine, job_id)
    return [(part, problem) for part in store.job_parts(engine, job_id)
            if (problem := part_problem(part, *_part_bytes(engine, job, part))) is not None]


def _read_part(engine: Engine, job: Job, part: ResultPart) -> pa.Table:
    data, where = _part_bytes(engine, job, part)
    problem = part_problem(part, data, where)
    if problem is None:
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            problem = f"{where} is unreadable ({exc})"
    raise UserError(f"job {job.id}: {problem}",
                    f"run `flexjob retry {job.id}` to regenerate the rows of damaged parts")


def _unfinished_hint(job: Job) -> str:
    if job.status in (JobStatus.CANCELLED, JobStatus.FAILED):
        return (f"pass --partial to write the rows done so far, or `flexjob retry {job.id}` and "
                "`flexjob work` to finish it")
    return "wait for it to complete, or pass --partial to write the rows done so far"


def write_results(engine: Engine, job_id: int, out_path: str | Path, *, partial: bool = False,
                  force: bool = False) -> ResultsSummary:
    """Write the job's rows to `out_path` (format by extension); an existing file only with `force`."""
    out_path = Path(out_path)
    fmt = check_output_path(out_path, force=force)
    job = store.get_job(engine, job_id)
    if job.status != JobStatus.COMPLETED and not partial:
        raise UserError(f"job {job_id} is {job.status.value} with {job.done_rows} of {job.total_rows} rows done",
                        _unfinished_hint(job))
    parts_by_shard: dict[int, list[ResultPart]] = defaultdict(list)
    for part in store.job_parts(engine, job_id):
        parts_by_shard[part.shard_id].append(part)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    writer = open_writer(fmt, tmp, OutputContext(job_id=job.id, model=Path(job.model_dir).name))
    rows = missing = 0
    reasons: dict[str, int] = defaultdict(int)
    try:
        for shard in store.list_shards(engine, job_id):
            tables = [_read_part(engine, job, p) for p in parts_by_shard.get(shard.id, [])]
            if not tables:
                missing += shard.row_end - shard.row_start
                continue
            table = pa.concat_tables(tables).sort_by("row")
            got = table.num_rows
            _check_shard_rows(job, shard, table.column("row").to_pylist(), partial=partial)
            missing += shard.row_end - shard.row_start - got
            for reason, count in zip(*_value_counts(table.column("finish_reason"))):
                reasons[reason] += count
            writer.write(table)
            rows += got
        writer.close()
        if rows == 0:
            raise UserError(f"job {job_id} has no finished rows yet", "wait for a worker to finish a block")
        os.replace(tmp, out_path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return ResultsSummary(path=out_path, rows=rows, missing_rows=missing, error_rows=reasons.get("error", 0),
                          finish_reasons=dict(reasons))


def _check_shard_rows(job: Job, shard, got: list[int], *, partial: bool) -> None:
    """Every row of the shard's parts lies in the shard, once; all of them unless `partial`."""
    if len(set(got)) != len(got):
        dup = next(r for i, r in enumerate(got) if i and got[i - 1] == r)
        raise UserError(f"job {job.id}: row {dup} appears more than once in the result parts",
                        f"this is a bug; run `flexjob retry {job.id}` after reporting it")
    if got[0] < shard.row_start or got[-1] >= shard.row_end:
        raise UserError(f"job {job.id}: a part of shard {shard.shard_index} holds rows outside "
                        f"{shard.row_start}..{shard.row_end - 1}", "this is a bug; please report it")
    if len(got) != shard.row_end - shard.row_start and not partial:
        present = set(got)
        absent = next(r for r in range(shard.row_start, shard.row_end) if r not in present)
        raise UserError(f"job {job.id}: row {absent} has no result", "pass --partial to write the rows that have one")


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = column.value_counts()
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


@dataclass(frozen=True, kw_only=True)
class RetryReport:
    lines: list[str]


# Error rows whose message starts so come from the prompt itself (null, empty, not UTF-8, too long):
# with the job's fixed parameters they fail the same way every time.
INPUT_PROBLEM_PREFIX = "prompt is "


def _parts_worth_regenerating(engine: Engine, job: Job, part_ids: list[int]) -> tuple[list[int], int]:
    """Of the parts holding error rows, those with an error a new attempt could avoid, and the
    number of error rows left out because only their prompt is at fault."""
    parts = {p.id: p for p in store.job_parts(engine, job.id)}
    keep, skipped_rows = [], 0
    for part_id in part_ids:
        errors = [e for e in _read_part(engine, job, parts[part_id]).column("error").to_pylist() if e is not None]
        if all(e.startswith(INPUT_PROBLEM_PREFIX) for e in errors):
            skipped_rows += len(errors)
        else:
            keep.append(part_id)
    return keep, skipped_rows


def _drop_failed_rows(engine: Engine, job: Job, *, all_rows: bool) -> tuple[list[str], bool]:
    """Report lines, and whether any part was dropped."""
    part_ids = store.failed_row_parts(engine, job.id)
    skipped = 0
    if not all_rows:
        part_ids, skipped = _parts_worth_regenerating(engine, job, part_ids)
    lines = []
    if skipped:
        lines.append(f"{skipped} error rows are kept: their prompt is the problem (null, empty, not UTF-8 or "
                     "too long) and would fail again; pass --all to regenerate them too")
    if part_ids:
        rows = store.drop_parts(engine, job.id, part_ids, reason="retry --failed-rows")
        lines.append(f"{rows} rows of {len(part_ids)} blocks with error rows will be generated again")
    return lines, bool(part_ids)


def retry(engine: Engine, job_id: int, *, failed_rows: bool = False, all_rows: bool = False) -> RetryReport:
    """`flexjob retry`: drop missing/damaged parts (and with `failed_rows` the parts holding error
    rows a new attempt could change; with `all_rows` every one) so their rows are generated again,
    and reopen a failed or cancelled job."""
    job = store.get_job(engine, job_id)
    lines: list[str] = []
    requeued = False
    damaged = damaged_parts(engine, job_id)
    if damaged:
        rows = store.drop_parts(engine, job_id, [p.id for p, _ in damaged], reason="missing or damaged parts")
        lines += [problem for _, problem in damaged]
        lines.append(f"{rows} rows of {len(damaged)} damaged parts will be generated again")
        requeued = True
    if failed_rows:
        dropped_lines, dropped = _drop_failed_rows(engine, job, all_rows=all_rows)
        requeued = requeued or dropped
        lines += dropped_lines
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        store.retry_job(engine, job_id)
        lines.append(f"job {job_id} was {job.status.value}; its unfinished shards are queued again")
        requeued = True
    if not lines:
        hint = ("pass --failed-rows to regenerate its error rows" if job.failed_rows
                else "nothing failed and every part is intact")
        raise UserError(f"job {job_id} is {job.status.value}; there is nothing to retry", hint)
    if requeued:
        lines.append(f"job {job_id} is queued; run `flexjob work` to finish it")
    return RetryReport(lines=lines)
