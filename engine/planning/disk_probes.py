"""Disk probes: read and write bandwidth and latency as the engine's disk tier sees them.

- reads bypass the page cache (O_DIRECT into page-aligned buffers; if the filesystem refuses
  O_DIRECT, posix_fadvise(DONTNEED) after fsync), because with tens of GiB of RAM a "disk" tier
  under the RAM size is otherwise served from memory;
- writes include fsync, as the engine's disk tier must not count on dirty pages;
- on a host without a GPU the disk is measured beside a compute load (`cpu_busy`), and the share
  of compute lost to the I/O thread is measured too (`measure_io_interference`).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.planning.timing import best_of, timed, typical

DEFAULT_DISK_BYTES = 256 * 2 ** 20
# The settled files' read is timed in this many groups of DEFAULT_DISK_BYTES (where the directory
# holds that much) and the median group's rate counts: a cloud disk's rate wanders by the second
# (2-vCPU Zen4 VM, 256 MiB reads a second apart: 1.25 to 2.0 GB/s, where the engine's reads then
# averaged 1.95 over 48 s).
READ_GROUPS = 3
WRITE_REPEATS = 2
_CHUNK = 8 * 2 ** 20  # O_DIRECT needs offsets, sizes and buffers aligned; 8 MiB is aligned to all


@contextlib.contextmanager
def cpu_busy(dtype: torch.dtype) -> Iterator[None]:
    """A background thread running prefill-sized matmuls, as the engine's compute does."""
    stop = threading.Event()

    def burn() -> None:
        x = torch.full((512, 2048), 0.5, dtype=dtype)
        w = torch.full((8192, 2048), 0.01, dtype=dtype)
        with torch.inference_mode():
            while not stop.is_set():
                torch.nn.functional.linear(x, w)
    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def measure_io_interference(disk_dir: Path, dtype: torch.dtype, seconds: float = 0.25,
                            nbytes: int = 4 * _CHUNK) -> float:
    """Share of a decode-shaped matmul's time lost while a thread reads the disk beside it (the
    engine's I/O thread shares the cores on a CPU-only host). Decode-shaped because decode steps
    stream their weights from memory and suffer most: on a 2-vCPU AVX2 VM 0.59 at 32 rows against
    0.41 at 512; instrumented, the engine's decode lost ~0.6 s of compute per second of I/O.
    Median calls, not fastest: the fastest call beside the reader is the one it disturbed least
    (2-vCPU Zen4, bf16: 0.05-0.14 from the fastest calls, 0.18-0.19 from the median ones)."""
    path = disk_dir.resolve() / f".flexjob-interference-probe-{os.getpid()}"
    buf = mmap.mmap(-1, _CHUNK)
    buf.write(os.urandom(_CHUNK))
    stop = threading.Event()
    try:
        _write_probe(path, nbytes, buf)
        reading = [(path, nbytes)] + _settled_files(disk_dir.resolve(), nbytes)

        def reader() -> None:
            while not stop.is_set():
                for f, n in reading:
                    _read_uncached(f, n, buf)
        x = torch.full((32, 2048), 0.5, dtype=dtype)
        ws = [torch.full((8192, 2048), 0.01, dtype=dtype) for _ in range(4)]  # > L3: streamed

        def step() -> None:
            with torch.inference_mode():
                for w in ws:
                    torch.nn.functional.linear(x, w)
        alone = typical(step, seconds)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        beside = typical(step, seconds)
        stop.set()
        thread.join()
        return max(0.0, 1.0 - alone / beside)
    finally:
        stop.set()
        buf.close()
        path.unlink(missing_ok=True)


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest mount-point prefix)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


@dataclass(frozen=True)
class DiskProbe:
    """What `measure_disk` found, GB/s: `read_gbps` is for files that have sat a while (the weight
    store), `fresh_read_gbps` for a file read back right after it was written (a KV cache on disk
    is read one step after it was written); the two are equal where nothing settled was there."""
    write_gbps: float
    read_gbps: float
    fresh_read_gbps: float
    method: str


def measure_disk(disk_dir: Path, nbytes: int = DEFAULT_DISK_BYTES) -> DiskProbe:
    """Write bandwidth with fsync and read bandwidth with the page cache bypassed."""
    nbytes = max(_CHUNK, nbytes // _CHUNK * _CHUNK)
    path = disk_dir.resolve() / f".flexjob-disk-probe-{os.getpid()}"
    buf = mmap.mmap(-1, _CHUNK)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(_CHUNK))  # incompressible
    try:
        # Writes are repeated and the fastest kept. Reads are not: a second read of the same file
        # is served partly by the host's cache of it (see below), which the engine's reads are not.
        write_s = best_of(lambda: _write_probe(path, nbytes, buf), WRITE_REPEATS)
        read_s, method = _read_uncached(path, nbytes, buf)
        fresh_gbps = read_gbps = nbytes / read_s / 1e9
        settled = _settled_files(disk_dir.resolve(), nbytes * READ_GROUPS) or _settled_files(disk_dir.resolve(), nbytes)
        if settled and method == "O_DIRECT":
            # A file just written reads faster than the engine's weight files will (on a 2-vCPU
            # cloud VM 2.4-3.7 GB/s against 1.7-2.1 for weight files written an hour before, back
            # to back): the host still caches what it was just sent. Read what the engine reads.
            timed_reads = [(n, _read_uncached(f, n, buf)[0]) for f, n in settled]
            read_gbps = statistics.median(sum(n for n, _ in group) / sum(s for _, s in group)
                                          for group in _groups_of(timed_reads, nbytes)) / 1e9
            method += ", files written earlier"
        return DiskProbe(nbytes / write_s / 1e9, read_gbps, fresh_gbps, method)
    finally:
        buf.close()
        path.unlink(missing_ok=True)


def _groups_of(timed_reads: list[tuple[int, float]], nbytes: int) -> list[list[tuple[int, float]]]:
    """(bytes, seconds) reads in order, in groups of at least nbytes (the last takes any rest)."""
    groups, current, total = [], [], 0
    for read in timed_reads:
        current.append(read)
        total += read[0]
        if total >= nbytes:
            groups.append(current)
            current, total = [], 0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


def _write_probe(path: Path, nbytes: int, buf: mmap.mmap) -> float:
    """Write nbytes of `buf` repeated (a multiple of its size) and fsync; returns the seconds taken."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(nbytes // len(buf)):
            os.write(fd, buf)
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _settled_files(disk_dir: Path, nbytes: int, min_age_s: float = 600.0) -> list[tuple[Path, int]]:
    """Files under disk_dir (a weight store, say) not written for min_age_s, biggest first, with
    the whole 8 MiB chunks to read of each, adding up to nbytes; [] if they do not."""
    now, found = time.time(), []
    for path in disk_dir.rglob("*"):
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file() and not path.name.startswith(".flexjob-") and st.st_size >= _CHUNK \
                and now - st.st_mtime >= min_age_s:
            found.append((path, st.st_size // _CHUNK * _CHUNK))
    out, total = [], 0
    for path, n in sorted(found, key=lambda f: -f[1]):
        if total >= nbytes:
            break
        n = min(n, (nbytes - total + _CHUNK - 1) // _CHUNK * _CHUNK)
        out.append((path, n))
        total += n
    return out if total >= nbytes else []


def measure_disk_latency(disk_dir: Path, seconds: float = 0.25) -> tuple[float, float]:
    """Median seconds of one 4 KiB uncached read and of one 4 KiB write as the disk tier writes a
    page-aligned one: with O_DIRECT where the file system allows it, else write + fdatasync."""
    path = disk_dir.resolve() / f".flexjob-latency-probe-{os.getpid()}"
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, buf)
        os.fsync(fd)
        try:
            wfd = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            wfd = None

        def write_direct():
            os.pwrite(wfd, buf, 0)

        def write_sync():
            os.pwrite(fd, buf, 0)
            os.fdatasync(fd)
        try:
            write_lat = timed(write_direct, seconds / 2) if wfd is not None else timed(write_sync, seconds / 2)
        except OSError:  # O_DIRECT accepted at open, refused at write (some filesystems)
            write_lat = timed(write_sync, seconds / 2)
        finally:
            if wfd is not None:
                os.close(wfd)
        try:
            rfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            drop = False
        except OSError:
            rfd, drop = os.open(path, os.O_RDONLY), True
        try:
            def read():
                if drop:
                    os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.preadv(rfd, [buf], 0)
            try:
                read_lat = timed(read, seconds / 2)
            except OSError:  # O_DIRECT accepted at open, refused at read (some filesystems)
                read_lat = 0.0
        finally:
            os.close(rfd)
        return read_lat, write_lat
    finally:
        os.close(fd)
        buf.close()
        path.unlink(missing_ok=True)


def _read_uncached(path: Path, nbytes: int, buf: mmap.mmap) -> tuple[float, str]:
    """Seconds to read the file without the page cache, and how that was achieved."""
    fstype = _fs_type(path)
    if fstype in ("tmpfs", "ramfs"):
        method = f"page-cache ({fstype} is memory)"
    else:
        method = "O_DIRECT" if hasattr(os, "O_DIRECT") else "fadvise"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd, method = None, "fadvise"
        if fd is not None:
            try:
                return _read_all(fd, nbytes, buf), method
            except OSError:
                method = "fadvise"  # the filesystem accepted the flag at open but not the read
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        if method == "fadvise":  # the file was fsynced, so its pages are clean and can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return _read_all(fd, nbytes, buf), method
    finally:
        os.close(fd)


def _read_all(fd: int, nbytes: int, buf: mmap.mmap) -> float:
    t0 = time.perf_counter()
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [buf], done)
        if got <= 0:
            break
        done += got
    return time.perf_counter() - t0
