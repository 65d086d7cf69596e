"""The fixed shapes the batch-invariant kernels (engine.model.kernels) give the math library, by
dtype name; torch-free, so the planner can count the calls they make without importing torch."""
from __future__ import annotations

import math

# Rows per linear-layer call: large enough that a prefill runs near the library's full speed, small
# enough that a decode micro-batch padded up to it costs little more than streaming the weights.
ROWS_PER_CALL = {"float32": 32, "bfloat16": 128, "float16": 128}
QUERIES_PER_CALL = 8  # >= 2 keeps MKL off its one-row (gemv) path, whose sums run in another order
KEY_ALIGN = 64  # a multiple of every SIMD width, so softmax never takes a scalar tail
ATTENTION_OPS_PER_QUERY_GROUP = 6  # bmm, mask, fill, softmax, bmm, copy out


def rows_per_call(dtype_name: str) -> int:
    return ROWS_PER_CALL.get(dtype_name, 128)


def linear_calls(rows: float, dtype_name: str) -> tuple[int, int]:
    """(calls, rows per call) for one linear layer over `rows` input rows."""
    chunk = rows_per_call(dtype_name)
    return max(1, math.ceil(rows / chunk)), chunk


def attention_calls(queries: float) -> int:
    """Query groups one (layer, micro-batch) attention sends to the library."""
    return max(1, math.ceil(queries / QUERIES_PER_CALL))
