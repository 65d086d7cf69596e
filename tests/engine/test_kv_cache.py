"""A cache slot is split by (row, head) pairs, the same way in every slot, and keeps every byte."""
import pytest
import torch

from engine.model import native_attention
from engine.runtime.compression import dequantize, quantize
from engine.runtime.kv_cache import CacheSlot
from engine.runtime.placement import cache_pair_split
from engine.runtime.policy import CompressionConfig
from engine.runtime.tiers import DiskTier, Tier, TransferStats


@pytest.mark.parametrize("pairs,gpu,cpu", [(36, 25, 25), (32, 0, 36.4), (2, 30, 30), (12, 100, 0),
                                           (12, 0, 0), (96, 33.3, 33.3)])
def test_pair_split_never_exceeds_the_memory_percents(pairs, gpu, cpu):
    g, c, d = cache_pair_split(pairs, gpu, cpu)
    assert g + c + d == pairs and min(g, c, d) >= 0
    assert g <= pairs * gpu / 100 + 1e-9 and g + c <= pairs * (gpu + cpu) / 100 + 1e-9
    assert g + c > pairs * (gpu + cpu) / 100 - 1  # at most one pair more on disk than asked


@pytest.mark.parametrize("compression", [None, CompressionConfig(num_bits=4, group_size=8)])
def test_parts_hold_their_pairs_on_their_tiers(tmp_path, compression):
    rows, heads, head_dim, max_len = 3, 4, 8, 6
    disk = DiskTier(tmp_path, TransferStats())
    slot = CacheSlot(rows, max_len, heads, head_dim, 25, 25, torch.float32, torch.device("cpu"), disk,
                     tmp_path / "kv-0-0.bin", compression=compression)
    assert [(p.tier, p.count) for p in slot.parts] == [(Tier.GPU, 3), (Tier.CPU, 3), (Tier.DISK, 6)]
    torch.manual_seed(0)
    written = torch.randn(5, 2, rows * heads, head_dim)
    for chunk in (written[:4], written[4:]):  # a prefill of 4 positions, then one decode step
        for part in slot.parts:
            part.append(chunk[:, :, part.pairs])
    back = torch.cat([part.read() for part in slot.parts], dim=2)
    if compression is None:
        assert torch.equal(back, written)
        on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())
        assert on_disk == 5 * 2 * 6 * head_dim * 4  # the disk part's pairs, nothing else
    else:  # the same as quantising the whole slot at once: groups never straddle a pair
        whole = dequantize(quantize(written, num_bits=4, group_size=8), torch.float32)
        assert torch.equal(back, whole)
    slot.close()
    assert not list(tmp_path.iterdir())


def test_disk_part_reads_into_the_callers_kept_buffer_with_room(tmp_path):
    disk = DiskTier(tmp_path, TransferStats())
    slot = CacheSlot(2, 8, 2, 16, 0, 0, torch.float32, torch.device("cpu"), disk, tmp_path / "kv.bin")
    (part,) = slot.parts
    buffers: dict = {}
    seen, ptr = [], None
    for step in range(3):
        new = torch.randn(1, 2, 4, 16)
        part.append(new)
        back = part.read(buffers=buffers)
        seen.append(new)
        # The positions read, plus one row of room for the caller's next position, in place.
        assert torch.equal(back[:step + 1], torch.cat(seen)) and back.shape[0] == step + 2
        assert back.data_ptr() == buffers[0].data_ptr()
        if ptr is not None:
            assert buffers[0].data_ptr() == ptr  # the same buffer, sized for the whole slot once
        ptr = buffers[0].data_ptr()
    slot.close()


def test_a_memory_part_keeps_each_pair_aligned_at_its_first_real_position(tmp_path):
    """Rows left-padded to one prompt length: a memory part stores pair p's position P at index
    P - first[p] (zeros elsewhere), reads back the position-major cache that was written, and
    attention over it in place gives what a float64 masked softmax gives, and bit for bit what
    attention over the position-major copy gives."""
    from engine.model.attention import attend, attend_aligned

    heads, head_dim, prompt = 2, 16, 4
    first = torch.tensor([0, 2, 3]).repeat_interleave(heads)  # prompts of 4, 2 and 1 tokens
    disk = DiskTier(tmp_path, TransferStats())
    slot = CacheSlot(3, prompt + 2, heads, head_dim, 0, 100, torch.float32, torch.device("cpu"), disk,
                     tmp_path / "kv.bin", first=first)
    (part,) = slot.parts
    torch.manual_seed(0)
    written = torch.randn(prompt + 2, 2, 6, head_dim)
    padding = torch.arange(prompt + 2)[:, None] < first[None, :]  # [T, pairs]
    written[padding[:, None, :, None].expand_as(written)] = 0.0
    for chunk in (written[:prompt], written[prompt:prompt + 1], written[prompt + 1:]):
        part.append(chunk)
    keys = part.aligned.keys
    for p, f in enumerate(first.tolist()):
        assert torch.equal(keys[p, :prompt + 2 - f], written[f:, 0, p])
        assert not keys[p, prompt + 2 - f:].any()
    assert torch.equal(part.read(), written)

    q = torch.randn(6, 1, head_dim)
    query_pos = torch.tensor([prompt + 1])
    got = attend_aligned(q, part.aligned.keys, part.aligned.values, first, query_pos)
    assert torch.equal(got, attend(q, written[:, 0], written[:, 1], first, query_pos))
    for p, f in enumerate(first.tolist()):
        k, v = written[f:, 0, p].double(), written[f:, 1, p].double()
        want = torch.softmax(q[p].double() @ k.T, dim=-1) @ v
        torch.testing.assert_close(got[p].double(), want, rtol=1e-5, atol=1e-6)
    slot.close()


@pytest.mark.parametrize("gpu_percent,cpu_percent", [(0, 100), (0, 55), (10, 55)])
def test_a_prefill_written_from_the_projections_layout_stores_what_the_position_major_rows_store(
        tmp_path, gpu_percent, cpu_percent):
    """append_heads (a prefill's keys and values as [B, s, H, D]) against append (the same positions
    position-major): the same aligned keys and values, for left-padded rows whose runs of equal
    padding span several rows, and for memory parts that end or start mid-row (10 % and 55 % of 5
    rows x 3 heads: pair 0 in the first part, pairs 1 .. 8 in the second)."""
    rows, heads, head_dim, prompt = 5, 3, 8, 6
    first = torch.tensor([0, 0, 2, 2, 5]).repeat_interleave(heads)
    torch.manual_seed(1)
    k, v = (torch.randn(rows, prompt, heads, head_dim) for _ in range(2))
    position_major = torch.stack((k, v)).permute(2, 0, 1, 3, 4).reshape(prompt, 2, rows * heads, head_dim)
    slots = [CacheSlot(rows, prompt + 1, heads, head_dim, gpu_percent, cpu_percent, torch.float32,
                       torch.device("cpu"), DiskTier(tmp_path / name, TransferStats()), tmp_path / name / "kv.bin",
                       first=first) for name in ("rows", "heads")]
    in_memory = [[part for part in slot.parts if part.aligned is not None] for slot in slots]
    assert [part.count for part in in_memory[0]] == {(0, 100): [15], (0, 55): [8], (10, 55): [1, 8]}[gpu_percent, cpu_percent]
    for by_rows, by_heads in zip(*in_memory):
        by_rows.append(position_major[:, :, by_rows.pairs])
        by_heads.append_heads(k, v)
        assert by_heads.length == by_rows.length == prompt
        assert torch.equal(by_heads.aligned.keys, by_rows.aligned.keys)
        assert torch.equal(by_heads.aligned.values, by_rows.aligned.values)
        real = torch.arange(prompt)[:, None] >= first[by_rows.pairs][None, :]  # [T, pairs]
        assert torch.equal(by_heads.read(), position_major[:, :, by_rows.pairs] * real[:, None, :, None])
    for slot in slots:
        slot.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_steps_position_written_in_one_pass_lands_where_the_scatter_puts_it(dtype):
    """native_attention.write_positions against torch's own scatter (index_put) on the same cache,
    pairs with different first positions; a position outside the capacity is refused."""
    if not native_attention.available():
        pytest.skip("no native attention kernel in this process (no C compiler, or switched off)")
    gen = torch.Generator().manual_seed(3)
    pairs, capacity, head_dim = 40, 64, 32
    keys = torch.randn(pairs, capacity, head_dim, generator=gen).to(dtype)
    values = torch.randn(pairs, capacity, head_dim, generator=gen).to(dtype)
    new_keys = torch.randn(pairs, head_dim, generator=gen).to(dtype)
    new_values = torch.randn(pairs, head_dim, generator=gen).to(dtype)
    at = torch.randint(0, capacity, (pairs,), generator=gen)
    want_keys, want_values = keys.clone(), values.clone()
    want_keys[torch.arange(pairs), at] = new_keys
    want_values[torch.arange(pairs), at] = new_values
    assert native_attention.write_positions(keys, values, new_keys, new_values, at)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    with pytest.raises(ValueError, match="outside the cache"):
        native_attention.write_positions(keys, values, new_keys, new_values, at + capacity)
    assert torch.equal(keys, want_keys)  # nothing written by the refused call
    assert not native_attention.write_positions(keys, values, new_keys.t().contiguous().t()[:, :16], new_values, at)
