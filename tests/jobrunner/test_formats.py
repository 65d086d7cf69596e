"""Input and output formats: JSONL (plain and OpenAI Batch API), CSV, `--limit`, and results
written by extension with --force and an existing parent directory required."""
from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobrunner import store
from jobrunner.cli import main
from jobrunner.store.db import open_store
from tests.support.jobs import SAMPLE_PROMPTS


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def batch_request(custom_id: str, prompt, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "opt-test", "prompt": prompt, "max_tokens": 3, "temperature": 0.0,
                     "top_p": 1.0, "seed": 7, "stop": ["\n\n"], **body}}


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def finished(tmp_path, tiny_model, prompts_file, run_worker):
    """Job 1: the twelve sample prompts, generated."""
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert cli("enqueue", prompts_file, "--model", tiny_model, "--id-column", "id", "--max-new-tokens", 3,
               "--db", url)[0] == 0
    run_worker(open_store(url))
    return url


def test_results_are_written_by_extension(tmp_path, finished):
    code, out = cli("results", 1, "-o", tmp_path / "out.parquet", "--db", finished)
    assert code == 0, out
    expected = pq.read_table(tmp_path / "out.parquet").to_pylist()
    code, out = cli("results", 1, "-o", tmp_path / "out.csv", "--db", finished)
    assert code == 0, out
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == SAMPLE_PROMPTS
    assert [r["completion"] for r in rows] == [r["completion"] for r in expected]
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(12)]


def test_an_existing_output_is_kept_unless_forced(tmp_path, finished):
    out_path = tmp_path / "out.parquet"
    out_path.write_text("keep me")
    code, out = cli("results", 1, "-o", out_path, "--db", finished)
    assert code == 1 and out.splitlines() == [f"error: output {out_path} already exists",
                                              "hint: pass --force to overwrite it, or choose another name"]
    assert out_path.read_text() == "keep me"
    code, out = cli("results", 1, "-o", out_path, "--force", "--db", finished)
    assert code == 0 and pq.read_table(out_path).num_rows == 12


def test_a_missing_output_directory_is_refused_not_created(tmp_path, finished):
    out_path = tmp_path / "no" / "such" / "out.parquet"
    code, out = cli("results", 1, "-o", out_path, "--db", finished)
    assert code == 1 and out.splitlines()[0] == f"error: output directory {out_path.parent} does not exist"
    assert not (tmp_path / "no").exists()


def test_an_unknown_output_extension_is_refused(tmp_path, finished):
    code, out = cli("results", 1, "-o", tmp_path / "out.txt", "--db", finished)
    assert code == 1 and out.splitlines()[0] == f"error: output {tmp_path / 'out.txt'}: unknown extension '.txt'"
    assert "hint: name the file .parquet, .csv or .jsonl" in out


def test_results_of_a_cancelled_job_hint_at_retry_not_waiting(tmp_path, tiny_model, prompts_file):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert cli("enqueue", prompts_file, "--model", tiny_model, "--db", url)[0] == 0
    assert cli("cancel", 1, "--db", url)[0] == 0
    code, out = cli("results", 1, "-o", tmp_path / "o.parquet", "--db", url)
    assert code == 1 and "wait for it" not in out
    assert "hint: pass --partial to write the rows done so far, or `flexjob retry 1`" in out


def check_batch_output_line(record: dict) -> None:
    """Strict shape of openai.types.BatchRequestOutput for a /v1/completions request."""
    assert set(record) == {"id", "custom_id", "response", "error"}
    assert isinstance(record["id"], str) and isinstance(record["custom_id"], str)
    if record["response"] is None:
        assert set(record["error"]) == {"code", "message"}
        assert isinstance(record["error"]["code"], str) and isinstance(record["error"]["message"], str)
        return
    assert record["error"] is None
    response = record["response"]
    assert set(response) == {"status_code", "request_id", "body"} and response["status_code"] == 200
    body = response["body"]
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and isinstance(body["created"], int)
    assert isinstance(body["model"], str)
    (choice,) = body["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(isinstance(v, int) and v >= 0 for v in usage.values())


def test_openai_batch_file_round_trip(tmp_path, tiny_model, run_worker):
    ids = [f"req-{i * 7 % 12}" for i in range(12)]  # not in sorted order: output keeps input order
    requests = [batch_request(custom_id, prompt) for custom_id, prompt in zip(ids, SAMPLE_PROMPTS)]
    requests[4]["body"]["prompt"] = None
    write_jsonl(tmp_path / "batch.jsonl", requests)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    code, out = cli("enqueue", tmp_path / "batch.jsonl", "--model", tiny_model, "--shard-rows", 5, "--db", url)
    assert code == 0, out
    assert "enqueued job 1 (batch): 12 rows in 3 shards" in out and "1 rows will be error rows (1 null)" in out
    job = store.get_job(open_store(url), 1)
    assert (job.params["max_new_tokens"], job.params["seed"], job.params["stop"]) == (3, 7, ["\n\n"])
    run_worker(open_store(url))
    assert cli("results", 1, "-o", tmp_path / "out.jsonl", "--db", url)[0] == 0
    assert cli("results", 1, "-o", tmp_path / "out.parquet", "--db", url)[0] == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for record in lines:
        check_batch_output_line(record)
    assert [r["custom_id"] for r in lines] == ids
    assert len({r["id"] for r in lines}) == 12
    assert lines[4]["response"] is None and lines[4]["error"]["message"] == "prompt is null"
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in table] == ids
    for record, row in zip(lines, table):
        if record["response"] is not None:
            assert record["response"]["body"]["choices"][0]["text"] == row["completion"]
            assert record["response"]["body"]["usage"]["completion_tokens"] == row["completion_tokens"]


def test_openai_lines_with_different_parameters_are_refused_naming_the_line(tmp_path, tiny_model):
    requests = [batch_request("a", "x"), batch_request("b", "y"), batch_request("c", "z", max_tokens=9)]
    write_jsonl(tmp_path / "batch.jsonl", requests)
    code, out = cli("enqueue", tmp_path / "batch.jsonl", "--model", tiny_model, "--db",
                    f"sqlite:///{tmp_path / 'f.db'}")
    assert code == 1
    assert out.splitlines() == [
        f"error: {tmp_path / 'batch.jsonl'} line 3: max_new_tokens differs from line 1 (9 vs 3)",
        "hint: a job has one parameter set: split the file by parameters and enqueue each part"]


@pytest.mark.parametrize("change, message", [
    ({"url": "/v1/chat/completions"}, "url '/v1/chat/completions' is not supported"),
    ({"custom_id": "a"}, "custom_id 'a' appears twice"),
    ({"body": {"model": "m", "prompt": [1, 2, 3]}}, "body.prompt must be a string, got list"),
    ({"body": {"model": "m", "prompt": "x", "logprobs": 5}}, "body field 'logprobs' is not supported"),
])
def test_malformed_openai_requests_are_refused_with_the_line(tmp_path, tiny_model, change, message):
    write_jsonl(tmp_path / "batch.jsonl", [batch_request("a", "x"), batch_request("b", "y") | change])
    code, out = cli("enqueue", tmp_path / "batch.jsonl", "--model", tiny_model, "--db",
                    f"sqlite:///{tmp_path / 'f.db'}")
    assert code == 1 and out.splitlines()[0] == f"error: {tmp_path / 'batch.jsonl'} line 2: {message}"


def test_plain_jsonl_and_csv_with_a_prompt_column_and_limit(tmp_path, tiny_model, run_worker):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "n": i} for i, p in enumerate(SAMPLE_PROMPTS)])
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "n"])
        writer.writerows([p, i] for i, p in enumerate(SAMPLE_PROMPTS))
    url = f"sqlite:///{tmp_path / 'f.db'}"
    code, out = cli("enqueue", tmp_path / "p.jsonl", "--model", tiny_model, "--id-column", "n", "--max-new-tokens",
                    2, "--db", url)
    assert code == 0 and "12 rows" in out, out
    code, out = cli("enqueue", tmp_path / "p.csv", "--model", tiny_model, "--max-new-tokens", 2, "--limit", 5,
                    "--db", url)
    assert code == 0 and "enqueued job 2 (p): 5 rows in 1 shards" in out, out
    run_worker(open_store(url))
    for job_id, rows in ((1, 12), (2, 5)):
        assert cli("results", job_id, "-o", tmp_path / f"{job_id}.parquet", "--db", url)[0] == 0
        table = pq.read_table(tmp_path / f"{job_id}.parquet")
        assert table.column("prompt").to_pylist() == SAMPLE_PROMPTS[:rows]
    assert pq.read_table(tmp_path / "1.parquet").column("id").to_pylist() == [str(i) for i in range(12)]
    # The same file with another --limit is another job; the same one again is the existing job.
    assert "already exists" in cli("enqueue", tmp_path / "p.csv", "--model", tiny_model, "--max-new-tokens", 2,
                                   "--limit", 5, "--db", url)[1]
    assert "enqueued job 3" in cli("enqueue", tmp_path / "p.csv", "--model", tiny_model, "--max-new-tokens", 2,
                                   "--db", url)[1]


def test_a_jsonl_line_that_is_not_json_is_named(tmp_path, tiny_model):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    code, out = cli("enqueue", tmp_path / "p.jsonl", "--model", tiny_model, "--db", f"sqlite:///{tmp_path / 'f.db'}")
    assert code == 1 and out.splitlines()[0].startswith(f"error: {tmp_path / 'p.jsonl'} line 2: not valid JSON")
