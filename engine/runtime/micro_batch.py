"""A block's rows as the schedule feeds them: each row's prompt and saved tokens (`BlockRow`), and
per micro-batch the left-padded token ids, the padding mask, the positions and which of the
prefill's tokens are prompt tokens (`MicroBatch`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.key_span import KeySpan, key_span
from engine.runtime.rows import RowResult


@dataclass
class BlockRow:
    result: RowResult
    context_ids: list[int]  # prompt + tokens generated before this run
    max_new_tokens: int
    prompt_len: int  # how many of context_ids are the prompt


class MicroBatch:
    """Token ids, padding mask and positions of one micro-batch for the whole block."""

    def __init__(self, rows: list[BlockRow], prompt_len: int, max_len: int, pad_id: int, kv_heads: int,
                 layers, device) -> None:
        self.rows = rows
        B = len(rows)
        self.input_ids = torch.full((B, prompt_len), pad_id, dtype=torch.long)
        self.valid = torch.zeros((B, max_len), dtype=torch.bool)
        for i, row in enumerate(rows):
            n = len(row.context_ids)
            self.input_ids[i, prompt_len - n:] = torch.tensor(row.context_ids, dtype=torch.long)
            self.valid[i, prompt_len - n:] = True
        self.valid[:, prompt_len:] = True  # generated positions are never padding
        # Which of the prefill's tokens are prompt tokens: all but a resumed row's saved generated
        # tokens, which are computed with the decode steps' library as when they were generated
        # (kernels.linear), so a resumed row continues with the numbers of an uninterrupted run.
        saved = [len(row.context_ids) - row.prompt_len for row in rows]
        self.prefill_prompt: bool | torch.Tensor = True
        if any(saved):
            self.prefill_prompt = torch.ones((B, prompt_len), dtype=torch.bool, device=device)
            for i, count in enumerate(saved):
                if count:
                    self.prefill_prompt[i, prompt_len - count:] = False
        self.positions = layers.positions_from_mask(self.valid)
        # Each row's first real cache position, repeated for its KV heads: [B*Hkv] in pair order.
        self.first = (prompt_len - torch.tensor([len(r.context_ids) for r in rows])).repeat_interleave(kv_heads)
        self.input_ids, self.positions, self.first = (t.to(device) for t in
                                                      (self.input_ids, self.positions, self.first))
        self.length = 0  # positions in the cache after this step
        self.next_ids = self.input_ids  # the step's input: the prompt first, then the sampled tokens
        self.key_spans: dict[tuple, KeySpan] = {}  # this step's, by (pairs, queries a pair, device): every layer's

    def begin_step(self, query_len: int) -> None:
        self.length += query_len
        self.query_len = query_len
        self.key_spans.clear()

    def key_span(self, pairs: slice, queries_per_pair: int, device: torch.device) -> KeySpan:
        """The keys each query of this step reads, for cache pairs `pairs` (a part of the slot) with
        `queries_per_pair` queries a pair (the step's positions, once per query head of a KV head),
        made on the first layer's call and reused by the others."""
        key = (pairs.start, pairs.stop, queries_per_pair, device)
        if key not in self.key_spans:
            query_pos = torch.arange(self.length - self.query_len, self.length,
                                     device=device).repeat(queries_per_pair // self.query_len)
            self.key_spans[key] = key_span(self.first[pairs].to(device), query_pos)
        return self.key_spans[key]

    @property
    def step_positions(self) -> torch.Tensor:
        return self.positions[:, self.length - self.query_len: self.length]

    @property
    def step_prompt(self) -> bool | torch.Tensor:
        """Which of the step's tokens are prompt tokens: the prefill's (bar saved ones), no decode step's."""
        return self.prefill_prompt if self.length == self.query_len else False
