"""Where tensors live and how bytes move between tiers: compute device, CPU memory, disk.

The disk tier reads with O_DIRECT into 4 KiB-aligned buffers when the file system allows it, and
otherwise drops the pages it read or wrote from the page cache (posix_fadvise DONTNEED): with 23 GiB
of RAM a "disk" tier would else be served from the page cache, and both budgets and bandwidth
figures would be a lie. Every transfer is counted per link (bytes, seconds) so the planner's
bandwidth monitor can compare reality with the hardware profile. A throttle caps a link's
bandwidth (a test knob for re-planning).
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO, Callable

import torch

ALIGN = 4096  # O_DIRECT needs offsets, sizes and buffer addresses on page boundaries


def align_up(n: int, a: int = ALIGN) -> int:
    """`n` rounded up to a multiple of `a`."""
    return (n + a - 1) // a * a


# Link names of the per-block figures {link: (bytes moved, busy seconds)}: the contract with the
# planner (engine.planning.hardware maps them to profile fields) and the bandwidth monitor.
DISK_READ = "disk_read"
DISK_WRITE = "disk_write"
CPU_TO_GPU = "cpu_to_gpu"
GPU_TO_CPU = "gpu_to_cpu"
LINKS = (DISK_READ, DISK_WRITE, CPU_TO_GPU, GPU_TO_CPU)
DEQUANTIZE = "dequantize"  # not a link: time spent decompressing weights, reported the same way


class Tier(str, Enum):
    GPU = "gpu"  # the compute device's memory (RAM itself on a host without CUDA)
    CPU = "cpu"
    DISK = "disk"


@dataclass
class LinkCounter:
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class TransferStats:
    """Bytes and busy seconds per link; `snapshot_and_reset` gives one block's figures."""
    links: dict[str, LinkCounter] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, link: str, nbytes: int, seconds: float) -> None:
        with self.lock:
            c = self.links.setdefault(link, LinkCounter())
            c.bytes += nbytes
            c.seconds += seconds

    def snapshot_and_reset(self) -> dict[str, tuple[int, float]]:
        with self.lock:
            out = {k: (v.bytes, v.seconds) for k, v in self.links.items() if v.bytes}
            self.links = {}
            return out


def write_once(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file derived from the weight store unless it exists: `write(f)` fills a temporary
    file, renamed into place when complete (a reader sees no file or a whole one; concurrent
    writers each use their own temporary name). On any failure, a full disk included, the
    temporary file is removed and the error raised."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def drop_cached_pages(fd: int, offset: int, nbytes: int) -> None:
    """Drop a range's clean pages from the page cache, the pages it only partly covers included
    (the kernel drops only the pages wholly inside the range it is given)."""
    first = offset - offset % ALIGN
    os.posix_fadvise(fd, first, align_up(offset + nbytes) - first, os.POSIX_FADV_DONTNEED)


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 tensor of `nbytes` whose data starts at a 4 KiB boundary (O_DIRECT needs it)."""
    size = align_up(nbytes)
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift:shift + size]


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, pin: bool = False) -> torch.Tensor:
    """A zero-filled tensor. In RAM (not pinned) its memory is a fresh anonymous mapping, which the
    kernel hands out zeroed page by page as it is first written, instead of a fill over the whole
    tensor up front: a 32-row opt-1.3b block's cache (1.2 GB in bfloat16) took 1.4 s to zero-fill
    at the start of its prefill (2-vCPU Xeon), where its pages' first writes cost 0.24-0.36 s for
    768 MB spread over the prefill's cache writes. The mapping is unmapped when the tensor is freed."""
    if device.type != "cpu" or pin:
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)  # the tensor keeps the mapping alive
    return region.view(dtype).view(shape)


class DiskTier:
    """Files under one directory; reads and writes that bypass the page cache."""

    def __init__(self, root: Path, stats: TransferStats, *, bypass_page_cache: bool = True,
                 throttle_gbps: dict[str, float] | None = None) -> None:
        self.root = root
        self.stats = stats
        self.bypass_page_cache = bypass_page_cache
        self.throttle_gbps = dict(throttle_gbps or {})  # link -> cap in GB/s (test knob)
        self._direct_ok: bool | None = None
        root.mkdir(parents=True, exist_ok=True)

    def _throttle(self, link: str, nbytes: int, started: float) -> None:
        cap = self.throttle_gbps.get(link)
        if cap:
            wanted = nbytes / (cap * 1e9)
            spent = time.perf_counter() - started
            if wanted > spent:
                time.sleep(wanted - spent)

    def read_into(self, path: Path, offset: int, out: torch.Tensor) -> None:
        """Fill the uint8 tensor `out` from `path` at `offset`."""
        self.read_spans_into(path, [(offset, out)])

    def read_spans_into(self, path: Path, spans: list[tuple[int, torch.Tensor]]) -> None:
        """Fill each uint8 buffer of the (offset, buffer) spans from `path`, counted as one disk read.
        Spans that follow one another in the file go in one call, each into its own buffer
        (`_read_spans`)."""
        started = time.perf_counter()
        self._read_spans(path, spans)
        self._account(DISK_READ, sum(buf.numel() for _, buf in spans), started)

    def read_rows(self, path: Path, offset: int, row_bytes: int, rows: list[int]) -> torch.Tensor:
        """Rows of a row-major table stored at `offset`, as a uint8 tensor
        [len(rows), row_bytes]: each row's page-aligned span is read into its own buffer (O_DIRECT
        works in whole pages; spans that follow one another in one call), through one open file, and
        the whole gather counts as one disk read (its copy into the result is not disk time)."""
        out = torch.empty(len(rows), row_bytes, dtype=torch.uint8)
        spans, starts = [], []
        for r in rows:
            start = offset + r * row_bytes
            first = start - start % ALIGN
            spans.append((first, aligned_empty(start + row_bytes - first)))
            starts.append(start - first)
        self.read_spans_into(path, spans)
        for i, ((_, buf), at) in enumerate(zip(spans, starts)):
            out[i] = buf[at:at + row_bytes]
        return out

    def _read_spans(self, path: Path, spans: list[tuple[int, torch.Tensor]]) -> None:
        """Read (offset, uint8 buffer) spans of one file, with O_DIRECT when all are aligned. Each run
        of spans that follow one another in the file is one vectored read (preadv): the disk sees one
        long request, not one per buffer (a layer of opt-1.3b with 4-bit weights, 16 tensors of 4 KiB
        to 9 MiB, read back to back: 2.25 GB/s tensor by tensor, 2.67 in one preadv; in 16 bits
        2.68 and 2.90; 2-vCPU Zen4 VM)."""
        aligned = all(off % ALIGN == 0 and buf.numel() % ALIGN == 0 and buf.data_ptr() % ALIGN == 0
                      for off, buf in spans)
        fd = self._open_direct(path, os.O_RDONLY) if aligned else None
        direct = fd is not None
        if not direct:
            fd = os.open(path, os.O_RDONLY)
        try:
            for start, views in _runs(spans):
                self._read_fully(fd, views, start)
                if not direct and self.bypass_page_cache:
                    drop_cached_pages(fd, start, sum(len(v) for v in views))
        finally:
            os.close(fd)

    @staticmethod
    def _read_fully(fd: int, views: list[memoryview], offset: int) -> None:
        """Fill `views` in turn from the file's `offset` on (a read may return fewer bytes than asked)."""
        views = [v for v in views if len(v)]
        while views:
            n = os.preadv(fd, views, offset)
            if n <= 0:
                raise OSError(f"short read at offset {offset}")
            offset += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    def write(self, path: Path, offset: int, data: torch.Tensor, *, sync: bool = False) -> None:
        """Write a tensor's bytes at `offset`; with `bypass_page_cache` they do not stay in the page
        cache, so that the next read really comes from the disk. Whole pages at a page offset go
        with O_DIRECT (staged through an aligned buffer where the tensor is not aligned): no flush
        and no cached copy. Other writes are flushed, then dropped (posix_fadvise only drops clean
        pages). `sync` adds a flush for durability; the engine's own files are scratch and need none."""
        started = time.perf_counter()
        raw = data.contiguous().reshape(-1).view(torch.uint8)
        nbytes = raw.numel()
        fd = None
        if self.bypass_page_cache and offset % ALIGN == 0 and nbytes % ALIGN == 0:
            fd = self._open_direct(path, os.O_WRONLY | os.O_CREAT)
            if fd is not None and raw.data_ptr() % ALIGN:
                raw = aligned_empty(nbytes).copy_(raw)
        direct = fd is not None
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view, done = memoryview(raw.numpy()).cast("B"), 0
            while done < nbytes:
                done += os.pwrite(fd, view[done:], offset + done)
            if sync or (self.bypass_page_cache and not direct):
                os.fdatasync(fd)
            if self.bypass_page_cache and not direct:
                drop_cached_pages(fd, offset, nbytes)
        finally:
            os.close(fd)
        self._account(DISK_WRITE, nbytes, started)

    def _open_direct(self, path: Path, flags: int) -> int | None:
        """A descriptor opened with O_DIRECT, or None where the file system refuses it (tmpfs):
        remembered, so that such a tier goes buffered from then on."""
        if not self.bypass_page_cache or self._direct_ok is False:
            return None
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno != errno.EINVAL:  # a missing file or a full disk is the caller's error
                raise
            self._direct_ok = False
            return None
        self._direct_ok = True
        return fd

    def read(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        # Page-aligned, so that aligned reads (a cache slot's whole positions) can bypass the page
        # cache with O_DIRECT instead of a buffered read dropped afterwards.
        out = aligned_empty(nbytes)[:nbytes]
        self.read_into(path, offset, out)
        return out

    def _account(self, link: str, nbytes: int, started: float) -> None:
        self._throttle(link, nbytes, started)
        self.stats.add(link, nbytes, time.perf_counter() - started)


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers one preadv takes


def _runs(spans: list[tuple[int, torch.Tensor]]) -> list[tuple[int, list[memoryview]]]:
    """(file offset, buffers) per run of spans, in the given order, each span starting where the one
    before it in the run ends."""
    runs: list[tuple[int, list[memoryview]]] = []
    end = None
    for offset, buf in spans:
        view = memoryview(buf.numpy()).cast("B")
        if offset == end and len(runs[-1][1]) < _IOV_MAX:
            runs[-1][1].append(view)
        else:
            runs.append((offset, [view]))
        end = offset + len(view)
    return runs


def to_device(t: torch.Tensor, device: torch.device, stats: TransferStats, link: str = CPU_TO_GPU) -> torch.Tensor:
    """Move to the compute device, counting the bytes when it is a real host->GPU copy."""
    if t.device == device:
        return t
    started = time.perf_counter()
    out = t.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    stats.add(link, t.numel() * t.element_size(), time.perf_counter() - started)
    return out
