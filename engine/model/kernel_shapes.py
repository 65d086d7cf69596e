"""The fixed shapes the batch-invariant kernels (engine.model.kernels) give the math library, by
dtype name; torch-free, so the planner can count the calls they make without importing torch."""
from __future__ import annotations

import math

# The reference row count of a linear-layer call, by dtype and token role: every generated token's
# numbers are those of a call of exactly ROWS_PER_CALL rows, every prompt token's those of a call of
# PROMPT_ROWS_PER_CALL rows. Other sizes in CHUNK_SIZES are used only where the library gives every
# row bit for bit what the role's reference call gives (kernels.linear checks each size once per
# weight shape): small ones so that a decode step computes no padding rows, large ones so that a
# prefill streams each weight matrix fewer times.
ROWS_PER_CALL = {"float32": 32, "bfloat16": 32, "float16": 32}
PROMPT_ROWS_PER_CALL = {"float32": 32, "bfloat16": 256, "float16": 256}
GPU_ROWS_PER_CALL = {"float32": 32, "bfloat16": 128, "float16": 128}  # a GPU: one reference for both roles
# Measured on 2-vCPU hosts: oneDNN's bf16 kernels on AVX512-BF16 (Zen4), its fp32 ones and MKL's
# sgemm (AVX2) give every size from 2 to 4096 rows the same bits; a 4096-row fp32 prefill sent in
# 128-row calls ran at 0.6x the speed of one call. oneDNN's bf16 kernels on AMX (Xeon) fall into
# classes by call size, {8, 16, 32}, {64, 128, 256} (for some shapes {128, 256} apart from 64) and
# {512 .. 4096} (for some shapes the same as the first): one reference per role keeps a decode
# step's 32 rows in one 32-row call (1.3-1.6 TFLOP/s) and a prefill in 256-row calls (2.1-3.3),
# where a single reference of 128 rows padded each decode call to 128.
CHUNK_SIZES = {name: (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
               for name in ("float32", "bfloat16", "float16")}  # each a divisor or multiple of a reference
# The reference query group of attention's matrix products: every query's numbers are those of a
# group of exactly this many (>= 2 keeps MKL off its one-row gemv path, whose sums run in another
# order). Other sizes in QUERY_GROUP_SIZES are used only where the library gives every query the
# reference's numbers bit for bit (attention.attend checks each call shape once): one query for a
# decode step, a whole prompt's queries for a prefill.
QUERIES_PER_CALL = 8
QUERY_GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SCORES_PER_CALL = 2 ** 25  # the most scores one attention call holds (64 MiB in bfloat16)
KEY_ALIGN = 64  # a multiple of every SIMD width, so softmax never takes a scalar tail
# A prefill's queries go in groups of at most this many: each group multiplies only the keys up to
# its last query (rounded up to KEY_ALIGN), so the causal triangle's upper half is skipped group by
# group (a 128-token prompt computes 3/4 of the square, a 2048-token one about half).
CAUSAL_QUERY_GROUP = KEY_ALIGN
ATTENTION_OPS_PER_QUERY_GROUP = 6  # bmm, mask, fill, softmax, bmm, copy out


def key_capacity(positions: int) -> int:
    """`positions` rounded up to KEY_ALIGN: the key count attention reads for them."""
    return -(-positions // KEY_ALIGN) * KEY_ALIGN


def rows_per_call(dtype_name: str, prompt: bool = False, device_type: str = "cpu") -> int:
    if device_type != "cpu":
        return GPU_ROWS_PER_CALL.get(dtype_name, 128)
    return (PROMPT_ROWS_PER_CALL if prompt else ROWS_PER_CALL).get(dtype_name, 128)


def chunk_sizes(dtype_name: str) -> tuple[int, ...]:
    return CHUNK_SIZES.get(dtype_name, (rows_per_call(dtype_name),))


def _plan(count: int, sizes, usable) -> list[int]:
    """Calls of the largest usable size that fits while at least that many items are left, then one
    call of the smallest usable size that holds the rest (zero-padded). A size is checked for
    usability only when it is the next candidate, so no check runs for a size the plan cannot use
    (a check costs a call of that size)."""
    ascending = sorted(sizes)
    plan: list[int] = []
    whole_size = next((s for s in reversed(ascending) if s <= count and usable(s)), None)
    if whole_size is not None:
        whole, count = divmod(count, whole_size)
        plan = [whole_size] * whole
    if count:
        plan.append(next(s for s in ascending if s >= count and usable(s)))
    return plan


def chunk_plan(rows: int, dtype_name: str, usable=lambda size: True, prompt: bool = False,
               device_type: str = "cpu") -> list[int]:
    """The row count of each linear-layer call for `rows` rows of one token role (the role's
    reference size is always usable)."""
    ref = rows_per_call(dtype_name, prompt, device_type)
    return _plan(rows, chunk_sizes(dtype_name), lambda size: size == ref or usable(size))


def query_plan(queries: int, pairs: int = 1, keys: int = 1) -> list[int]:
    """The query-group sizes of one attention over `queries` queries of `pairs` pairs and `keys`
    keys: groups of up to CAUSAL_QUERY_GROUP, fewer where SCORES_PER_CALL scores allow fewer (at
    least the reference group)."""
    cap = max(QUERIES_PER_CALL, min(CAUSAL_QUERY_GROUP, SCORES_PER_CALL // max(1, pairs * keys)))
    return _plan(queries, QUERY_GROUP_SIZES, lambda size: size <= cap)


def attended_scores(queries: int) -> int:
    """Query-key products per pair of a prefill over `queries` consecutive positions from 0: each
    query group against the keys up to its last query (what attention.attend computes)."""
    total, start = 0, 0
    for size in query_plan(queries):
        end = min(start + size, queries)
        total += size * key_capacity(end)
        start = end
    return total


def linear_calls(rows: float, dtype_name: str) -> list[tuple[int, int]]:
    """(calls, rows per call) for one linear layer over `rows` input rows, by call size (every
    size in CHUNK_SIZES counted as usable, the library's usual answer: then the plan is the same
    for either token role)."""
    plan = chunk_plan(max(1, math.ceil(rows)), dtype_name)
    return [(plan.count(size), size) for size in sorted(set(plan))]


def attention_calls(queries: float) -> int:
    """Query groups one (layer, micro-batch) attention sends to the library (groups of every size in
    QUERY_GROUP_SIZES counted as usable)."""
    return len(query_plan(max(1, math.ceil(queries))))
