"""Helpers for job tests: prompt files, the `flexjob` command as a subprocess, reading results."""
from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_prompts(path: Path, prompts: list, *, column: str = "prompt", ids: list | None = None,
                  row_group_size: int | None = None, prompt_type: pa.DataType | None = None) -> Path:
    columns = {column: pa.array(prompts, type=prompt_type)}
    if ids is not None:
        columns["id"] = pa.array(ids)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


SAMPLE_PROMPTS = [
    "def fibonacci(n):", "import os\nimport sys\n", "class Queue:", "# Read the configuration file",
    "for i in range(10):", "return self._value", "with open(path) as f:", "raise ValueError(",
    "async def fetch(url):", "if __name__ == '__main__':", "x = [i * i for i in", "try:\n    import",
]


def flexjob_command(*args: str) -> list[str]:
    """`flexjob ARGS` as a real subprocess of this interpreter."""
    return [sys.executable, "-c", "from jobrunner.cli import main; main()", *map(str, args)]


def read_results(path: Path) -> list[dict]:
    return pq.read_table(path).select(["row", "completion", "completion_tokens", "finish_reason", "error"]).to_pylist()
