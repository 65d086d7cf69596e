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

from engine.runtime.tiers import ALIGN, DISK_WRITE, DiskTier, TransferStats, aligned_empty

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
