"""The fixed shapes the batch-invariant kernels (engine.model.kernels) give the math library, by
dtype name; torch-free, so the planner can count the calls they make without importing torch."""
from __future__ import annotations

import math

# The reference row count of a linear-layer call, by dtype: every row's numbers are those of a
# call of exactly this many rows. Other sizes in CHUNK_SIZES are used only where the library gives
# every row bit for bit what the reference call gives (kernels.linear checks each size once per
# weight shape): small ones so that a decode step computes no padding rows, large ones so that a
# prefill streams each weight matrix fewer times.
ROWS_PER_CALL = {"float32": 32, "bfloat16": 128, "float16": 128}
CHUNK_SIZES = {"float32": (8, 16, 32, 64, 128), "bfloat16": (8, 16, 32, 64, 128, 512, 1024, 2048, 4096),
               "float16": (8, 16, 32, 64, 128, 512, 1024, 2048, 4096)}  # each a divisor or multiple of the reference
QUERIES_PER_CALL = 8  # >= 2 keeps MKL off its one-row (gemv) path, whose sums run in another order
KEY_ALIGN = 64  # a multiple of every SIMD width, so softmax never takes a scalar tail
ATTENTION_OPS_PER_QUERY_GROUP = 6  # bmm, mask, fill, softmax, bmm, copy out


def rows_per_call(dtype_name: str) -> int:
    return ROWS_PER_CALL.get(dtype_name, 128)


def chunk_sizes(dtype_name: str) -> tuple[int, ...]:
    return CHUNK_SIZES.get(dtype_name, (rows_per_call(dtype_name),))


def chunk_plan(rows: int, dtype_name: str, usable=lambda size: True) -> list[int]:
    """The row count of each library call for `rows` rows, in order: calls of the largest usable size
    while at least that many rows are left, then one call of the smallest usable size that holds the
    rest (zero-padded). The reference size is always usable."""
    ref = rows_per_call(dtype_name)
    sizes = [s for s in chunk_sizes(dtype_name) if s == ref or usable(s)]
    whole, rest = divmod(rows, sizes[-1])
    return [sizes[-1]] * whole + ([next(s for s in sizes if s >= rest)] if rest else [])


def linear_calls(rows: float, dtype_name: str) -> list[tuple[int, int]]:
    """(calls, rows per call) for one linear layer over `rows` input rows, by call size (every
    size in CHUNK_SIZES counted as usable: the library's usual answer)."""
    plan = chunk_plan(max(1, math.ceil(rows)), dtype_name)
    return [(plan.count(size), size) for size in sorted(set(plan))]


def attention_calls(queries: float) -> int:
    """Query groups one (layer, micro-batch) attention sends to the library."""
    return max(1, math.ceil(queries / QUERIES_PER_CALL))
