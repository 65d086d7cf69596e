"""The disk tier keeps what it writes out of the page cache, and reads back the same bytes.

Residency is asked of the kernel itself (mincore over a mapping of the file), so a page the tier
left cached is seen whatever path wrote it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
import torch

from engine.runtime.tiers import ALIGN, DISK_READ, DISK_WRITE, DiskTier, TransferStats, aligned_empty

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path: Path) -> int:
    """How many of the file's pages the page cache holds now."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def direct_io_allowed(root: Path) -> bool:
    try:
        os.close(os.open(root / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("offset, nbytes, misaligned_source", [
    (0, 16 * ALIGN, False),          # whole pages at a page offset: O_DIRECT
    (3 * ALIGN, 2 * ALIGN, True),    # the same from a tensor that is not page-aligned (staged)
    (100, 5000, False),              # neither: written, flushed and dropped
])
def test_writes_leave_no_cached_pages_and_read_back(tmp_path, offset, nbytes, misaligned_source):
    stats = TransferStats()
    disk = DiskTier(tmp_path, stats)
    if offset % ALIGN == 0 and not direct_io_allowed(tmp_path):
        pytest.skip(f"{tmp_path} does not allow O_DIRECT (tmpfs?): the buffered path is the third case")
    gen = torch.Generator().manual_seed(nbytes)
    payload = aligned_empty(nbytes + 1)[:nbytes + 1]
    payload.copy_(torch.randint(0, 256, (nbytes + 1,), dtype=torch.uint8, generator=gen))
    data = payload[1:] if misaligned_source else payload[:nbytes]
    assert (data.data_ptr() % ALIGN != 0) == misaligned_source
    path = tmp_path / "part.bin"

    disk.write(path, offset, data)

    assert resident_pages(path) == 0
    assert stats.snapshot_and_reset()[DISK_WRITE][0] == nbytes
    assert torch.equal(disk.read(path, offset, nbytes), data)
    assert resident_pages(path) == 0


def test_appends_build_the_file_a_position_at_a_time(tmp_path):
    """A cache part on disk grows one position (whole pages) a step; every position reads back."""
    disk = DiskTier(tmp_path, TransferStats())
    path = tmp_path / "slot.bin"
    row_bytes = 2 * ALIGN
    rows = [torch.full((row_bytes,), i, dtype=torch.uint8) for i in range(6)]
    for i, row in enumerate(rows):
        disk.write(path, i * row_bytes, row)
    assert torch.equal(disk.read(path, 0, len(rows) * row_bytes), torch.cat(rows))
    assert resident_pages(path) == 0


def test_a_missing_directory_is_an_error_not_a_fallback(tmp_path):
    disk = DiskTier(tmp_path, TransferStats())
    with pytest.raises(FileNotFoundError):
        disk.write(tmp_path / "gone" / "part.bin", 0, torch.zeros(ALIGN, dtype=torch.uint8))
    disk.write(tmp_path / "part.bin", 0, torch.zeros(ALIGN, dtype=torch.uint8))
    assert resident_pages(tmp_path / "part.bin") == 0


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("short_reads", [False, True])
def test_spans_back_to_back_are_read_in_one_call_each_into_its_own_buffer(tmp_path, monkeypatch, direct, short_reads):
    """Spans that follow one another in the file are one vectored read; a gap or an overlap starts
    another; a read that returns fewer bytes than asked goes on where it stopped."""
    if direct and not direct_io_allowed(tmp_path):
        pytest.skip(f"{tmp_path} does not allow O_DIRECT (tmpfs?)")
    path = tmp_path / "layer.bin"
    content = torch.randint(0, 256, (40 * ALIGN,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path.write_bytes(content.numpy().tobytes())
    # (offset, pages): three back to back, a gap, two back to back, then one overlapping the last
    layout = [(0, 2), (2, 5), (7, 1), (12, 3), (15, 4), (17, 2)]
    spans = [(page * ALIGN, aligned_empty(pages * ALIGN)) for page, pages in layout]
    calls = []
    real_preadv = os.preadv

    def counting_preadv(fd, views, offset):
        calls.append((offset, len(views)))
        if short_reads:  # one page at a time
            return real_preadv(fd, [views[0][:ALIGN]], offset)
        return real_preadv(fd, views, offset)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    disk = DiskTier(tmp_path, TransferStats(), bypass_page_cache=direct)
    disk.read_spans_into(path, spans)
    for offset, buf in spans:
        assert torch.equal(buf, content[offset:offset + buf.numel()])
    if short_reads:
        assert len(calls) == sum(pages for _, pages in layout)
    else:
        assert calls == [(0, 3), (12 * ALIGN, 2), (17 * ALIGN, 1)]
    assert disk.stats.snapshot_and_reset()[DISK_READ][0] == sum(buf.numel() for _, buf in spans)
