"""`flexjob enqueue`: validate the input and model, fingerprint both, create the job and its shards.

Everything that changes the output is part of the job (JobParams + model fingerprint + input
fingerprint), hashed into the job key: enqueueing the same file content with the same parameters
returns the existing job, and every worker and every resume reproduces the same rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from engine.model.config import load_config
from engine.runtime.devices import DTYPE_NAMES
from jobrunner import store
from jobrunner.errors import UserError
from jobrunner.store.models import Job
from jobrunner.io.convert import ConvertedInput, convert_input, input_kind
from jobrunner.home import flexjob_home
from jobrunner.io.inputs import InputInfo, count_problem_rows, fingerprint_file, inspect_input
from jobrunner.io.shard_inputs import cut_shards

TRUNCATE_MODES = ("error", "left")
DEFAULT_SHARD_ROWS = 1000
# Model files whose content decides the output; weights are sampled (head and tail of each file)
# because hashing a 300 GB checkpoint at every enqueue is not an option.
MODEL_SAMPLE_BYTES = 1 << 20
# How JobParams' validation messages name a field, and what an OpenAI request body calls it.
BODY_FIELD_NAMES = {"--max-new-tokens": "body.max_tokens", "--temperature": "body.temperature",
                    "--top-p": "body.top_p", "--stop": "body.stop"}


def _default_dtype() -> str:
    from engine.runtime.devices import default_dtype_name
    return default_dtype_name()


@dataclass(frozen=True, kw_only=True)
class JobParams:
    """The output-changing parameters of a job (stored as JSON in jobs.params)."""
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()          # stop strings: the completion is cut before the first one
    # Compute dtype, fixed per job so every worker agrees; default: what this machine runs fastest.
    dtype: str = field(default_factory=_default_dtype)
    # Prompts too long for the model's positions: "error" rows, or "left" = cut tokens from the left
    # (keeping BOS), so the end of the prompt, which the completion continues, survives.
    truncate: str = "error"

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.truncate not in TRUNCATE_MODES:
            problems.append(f"--truncate must be one of {', '.join(TRUNCATE_MODES)}, got {self.truncate!r}")
        if any(s == "" for s in self.stop):
            problems.append("--stop must not be empty")
        if problems:
            raise UserError("; ".join(problems), "see `flexjob enqueue --help`")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: dict) -> "JobParams":
        return cls(**(data | {"stop": tuple(data.get("stop", ()))}))


@dataclass(frozen=True, kw_only=True)
class EnqueueResult:
    job: Job
    created: bool
    problem_rows: dict[str, int]  # rows that will become error rows, by problem


def model_fingerprint(model_dir: str | Path) -> str:
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if not path.is_file():
            continue
        digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            if path.suffix in (".json", ".txt", ".model"):
                digest.update(f.read())
            else:
                digest.update(f.read(MODEL_SAMPLE_BYTES))
                f.seek(max(0, path.stat().st_size - MODEL_SAMPLE_BYTES))
                digest.update(f.read(MODEL_SAMPLE_BYTES))
    return digest.hexdigest()


def job_key(*, input_fingerprint: str, prompt_column: str, id_column: str | None,
            model_fingerprint_: str, params: JobParams, limit: int | None = None) -> str:
    payload = {"input": input_fingerprint, "column": prompt_column, "id_column": id_column,
               "model": model_fingerprint_, "params": params.to_dict()}
    if limit is not None:
        payload["limit"] = limit
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class _PreparedInput:
    """The Parquet file the workers read, and what the job key is computed from."""
    info: InputInfo
    column: str
    id_column: str | None
    source_fingerprint: str     # of the file the user gave (JSONL/CSV: not the Parquet copy)
    params: JobParams


def _prepare_input(input_path: Path, stack: ExitStack, *, column: str, id_column: str | None,
                   params: JobParams, limit: int | None) -> _PreparedInput:
    """The Parquet file to cut into shards: the input itself, or a JSONL/CSV file's Parquet copy in
    a staging directory of flexjob's home that `stack` removes once the prompts are in the store."""
    if input_kind(input_path) == "parquet":
        info = inspect_input(input_path, column, id_column)
        fingerprint = fingerprint_file(info.path)
        return _PreparedInput(info=info, column=column, id_column=id_column, source_fingerprint=fingerprint,
                              params=params)
    if not input_path.is_file():
        raise UserError(f"input file {input_path} does not exist", "check the path")
    source_fp = fingerprint_file(input_path)
    staging = flexjob_home() / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=staging)))
    converted = convert_input(input_path, out_dir, column=column, id_column=id_column, limit=limit)
    info = inspect_input(converted.path, "prompt", converted.id_column)
    return _PreparedInput(info=info, column="prompt", id_column=converted.id_column, source_fingerprint=source_fp,
                          params=_with_file_params(params, converted, input_path))


def _with_file_params(params: JobParams, converted: ConvertedInput, path: Path) -> JobParams:
    """The job's parameters with an OpenAI batch file's body fields in place of the options."""
    given = {k: v for k, v in converted.params.items() if v is not None}
    if not given:
        return params
    try:
        return dataclasses.replace(params, **given)
    except UserError as exc:
        message = str(exc)
        for option, body_field in BODY_FIELD_NAMES.items():
            message = message.replace(option, body_field)
        raise UserError(f"{path}: {message}", "fix the request bodies") from None


def enqueue(engine: Engine, input_path: str | Path, *, model_dir: str | Path, column: str = "prompt",
            id_column: str | None = None, params: JobParams = JobParams(), priority: int = 0,
            shard_rows: int = DEFAULT_SHARD_ROWS, name: str | None = None, force: bool = False,
            limit: int | None = None) -> EnqueueResult:
    """Create the job for a Parquet, JSONL (plain or OpenAI batch) or CSV file of prompts; with
    `limit`, only its first rows (a quick trial). The prompts are copied into the store, shard by
    shard, so that workers anywhere need nothing but the store (and the model directory)."""
    if shard_rows < 1:
        raise UserError(f"--shard-rows must be >= 1, got {shard_rows}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    config = load_config(model_dir)
    with ExitStack() as stack:
        prepared = _prepare_input(Path(input_path), stack, column=column, id_column=id_column, params=params,
                                  limit=limit)
        params, info = prepared.params, prepared.info
        if params.max_new_tokens >= config.max_positions:
            raise UserError(f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt: the model "
                            f"has {config.max_positions} positions", "lower --max-new-tokens")
        model_fp = model_fingerprint(model_dir)
        key = job_key(input_fingerprint=prepared.source_fingerprint, prompt_column=column, id_column=id_column,
                      model_fingerprint_=model_fp, params=params, limit=limit)
        total_rows = min(info.num_rows, limit) if limit is not None else info.num_rows
        problems = count_problem_rows(info.path, prepared.column, total_rows)
        source = Path(input_path).resolve()
        stat = source.stat()
        new = store.NewJob(
            name=name or Path(input_path).stem, priority=priority, job_key=key, input_path=str(source),
            input_fingerprint=prepared.source_fingerprint, input_size=stat.st_size, input_mtime_ns=stat.st_mtime_ns,
            prompt_column=prepared.column, id_column=prepared.id_column, model_dir=str(Path(model_dir).resolve()),
            model_fingerprint=model_fp, params=params.to_dict(), results_dir="", shard_rows=shard_rows,
            total_rows=total_rows)
        shards = cut_shards(info.path, prepared.column, prepared.id_column, shard_rows=shard_rows,
                            total_rows=total_rows)
        job, created = store.enqueue_job(engine, new, shard_inputs=((p.data, p.sha256) for p in shards),
                                         force=force)
    return EnqueueResult(job=job, created=created, problem_rows=problems)
