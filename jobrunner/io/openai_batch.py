"""The OpenAI Batch API file formats, for `/v1/completions` requests (vLLM's `run-batch` reads the same).

Input, one request per line:
    {"custom_id": "r1", "method": "POST", "url": "/v1/completions",
     "body": {"model": "opt-1.3b", "prompt": "...", "max_tokens": 64, "temperature": 0, "top_p": 1,
              "seed": 1, "stop": ["\\n"]}}
A flexjob job has one parameter set (it is part of the job's identity and every worker uses it),
so every line must carry the same parameters; a line that differs is refused with its number,
and the hint says to split the file by parameters. A field a body leaves out takes the value of
the matching `flexjob enqueue` option.

Output, one line per request in input order (the shape of openai.types.BatchRequestOutput):
    {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "...",
     "body": {"id": "cmpl-...", "object": "text_completion", "created": 1700000000, "model": "...",
              "choices": [{"text": "...", "index": 0, "logprobs": null, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}},
     "error": null}
An error row has `"response": null` and `"error": {"code": "row_error", "message": "..."}`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from jobrunner.errors import UserError

COMPLETIONS_URL = "/v1/completions"
# body field -> JobParams field
PARAM_FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                "seed": "seed", "stop": "stop"}
# Accepted and ignored: they do not change the completion.
IGNORED_FIELDS = {"model", "prompt", "user", "n", "stream"}


@dataclass(frozen=True, kw_only=True)
class BatchRequest:
    line: int                  # 1-based line number in the file
    custom_id: str
    prompt: str | None
    model: str
    params: dict[str, Any]     # JobParams field -> value, only the fields the body gives


def is_batch_request(record: object) -> bool:
    """Whether a parsed JSONL line looks like an OpenAI batch request (rather than a plain row)."""
    return isinstance(record, dict) and "custom_id" in record and "body" in record


def parse_request(record: dict, *, path: Path, line: int) -> BatchRequest:
    where = f"{path} line {line}"
    if not isinstance(record.get("custom_id"), str) or not record["custom_id"]:
        raise UserError(f"{where}: custom_id must be a non-empty string", "give every request a unique custom_id")
    if record.get("method", "POST") != "POST":
        raise UserError(f"{where}: method {record.get('method')!r} is not supported", 'use "method": "POST"')
    if record.get("url") != COMPLETIONS_URL:
        raise UserError(f"{where}: url {record.get('url')!r} is not supported",
                        f'flexjob runs text completions: use "url": "{COMPLETIONS_URL}" with a "prompt" body')
    body = record.get("body")
    if not isinstance(body, dict):
        raise UserError(f"{where}: body must be a JSON object", "see the OpenAI Batch API input format")
    unknown = sorted(set(body) - set(PARAM_FIELDS) - IGNORED_FIELDS)
    if unknown:
        raise UserError(f"{where}: body field {unknown[0]!r} is not supported",
                        f"supported fields: {', '.join(sorted(set(PARAM_FIELDS) | {'model', 'prompt'}))}")
    if body.get("n", 1) != 1 or body.get("stream", False):
        raise UserError(f"{where}: n > 1 and stream are not supported", "one completion per request")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"{where}: body.prompt must be a string, got {type(prompt).__name__}",
                        "token-id prompts and lists of prompts are not supported: one text prompt per line")
    params = {PARAM_FIELDS[k]: _param_value(k, v, where) for k, v in body.items() if k in PARAM_FIELDS}
    return BatchRequest(line=line, custom_id=record["custom_id"], prompt=prompt, model=str(body.get("model", "")),
                        params=params)


def _param_value(name: str, value: object, where: str) -> object:
    if value is None:
        return None
    if name == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise UserError(f"{where}: body.stop must be a string or a list of strings", "")
        return tuple(stops)
    if name in ("max_tokens", "seed"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise UserError(f"{where}: body.{name} must be a number, got {value!r}", "")
    return float(value) if name in ("temperature", "top_p") else value


class ParameterCheck:
    """Checks that every request carries the first one's model and parameters."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.first: BatchRequest | None = None
        self.custom_ids: set[str] = set()

    def check(self, request: BatchRequest) -> None:
        if request.custom_id in self.custom_ids:
            raise UserError(f"{self.path} line {request.line}: custom_id {request.custom_id!r} appears twice",
                            "custom_id must be unique within the file")
        self.custom_ids.add(request.custom_id)
        if self.first is None:
            self.first = request
            return
        mine = {k: v for k, v in request.params.items() if v is not None}
        first = {k: v for k, v in self.first.params.items() if v is not None}
        if mine != first or request.model != self.first.model:
            field = next((k for k in sorted(set(mine) | set(first)) if mine.get(k) != first.get(k)), "model")
            raise UserError(
                f"{self.path} line {request.line}: {field} differs from line {self.first.line} "
                f"({_show(request, field)} vs {_show(self.first, field)})",
                "a job has one parameter set: split the file by parameters and enqueue each part")


def _show(request: BatchRequest, field: str) -> str:
    return repr(request.model if field == "model" else request.params.get(field))


def batch_output_lines(rows: Iterable[dict], *, job_id: int, model: str) -> Iterator[str]:
    """One OpenAI batch output line (JSON text) per result row, in the order given."""
    import json

    for r in rows:
        yield json.dumps(_output_record(r, job_id=job_id, model=model), ensure_ascii=False)


def _output_record(r: dict, *, job_id: int, model: str) -> dict:
    custom_id = str(r["id"]) if r.get("id") is not None else f"request-{r['row']}"
    record: dict[str, Any] = {"id": f"batch_req_flexjob_{job_id}_{r['row']}", "custom_id": custom_id,
                              "response": None, "error": None}
    if r["finish_reason"] == "error":
        record["error"] = {"code": "row_error", "message": r["error"]}
        return record
    prompt_tokens, completion_tokens = int(r["prompt_tokens"] or 0), int(r["completion_tokens"] or 0)
    record["response"] = {
        "status_code": 200,
        "request_id": f"flexjob-{job_id}-{r['row']}",
        "body": {
            "id": f"cmpl-flexjob-{job_id}-{r['row']}",
            "object": "text_completion",
            "created": int(r["finished_at"].timestamp()),
            "model": model,
            "choices": [{"text": r["completion"], "index": 0, "logprobs": None,
                         "finish_reason": r["finish_reason"]}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        },
    }
    return record
