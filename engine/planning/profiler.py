"""Measure this host for the cost model: disk, memory, link bandwidths and FLOP/s, in a few seconds.

Every number is what the engine's own operations see, not a datasheet figure:
- disk read bypasses the page cache (O_DIRECT into page-aligned buffers; if the filesystem
  refuses O_DIRECT, posix_fadvise(DONTNEED) after fsync), because with tens of GiB of RAM a
  "disk" tier under the RAM size is otherwise served from memory (MACHINE-NOTES);
- disk write includes fsync, as the engine's disk tier must not count on dirty pages;
- "memory bandwidth" is the weight-streaming rate of a batch-1 linear layer in the compute
  dtype, which is what bounds small-batch decode on a CPU;
- CPU attention is a decode step's attention over a bf16 KV cache, in cache bytes per second.
The result is stored as JSON under $FLEXJOB_HOME/profiles (default ./.flexjob) keyed by host,
device and disk directory, and reused until it is older than MAX_AGE_S or --refresh.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch

from engine.planning.hardware import PROFILE_VERSION, HardwareProfile
from engine.planning.calibration import calibration_bytes, measure_compute_scale, model_key
from engine.model.config import OPTConfig

MAX_AGE_S = 7 * 24 * 3600
DEFAULT_DISK_BYTES = 256 * 2 ** 20
_CHUNK = 8 * 2 ** 20  # O_DIRECT needs offsets, sizes and buffers aligned; 8 MiB is aligned to all


def flexjob_home() -> Path:
    return Path(os.environ.get("FLEXJOB_HOME", ".flexjob"))


def profile_path(disk_dir: str | Path, home: Path | None = None) -> Path:
    disk_dir = str(Path(disk_dir).resolve())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    key = hashlib.sha1(f"{socket.gethostname()}|{device}|{disk_dir}".encode()).hexdigest()[:12]
    return (home or flexjob_home()) / "profiles" / f"{socket.gethostname()}-{key}.json"


def load_or_measure_profile(disk_dir: str | Path, refresh: bool = False, *,
                            home: Path | None = None, disk_bytes: int | None = None,
                            seconds_per_test: float = 0.25, max_age_s: float = MAX_AGE_S,
                            model: OPTConfig | None = None) -> HardwareProfile:
    """The stored profile of this host and disk directory, measured now if missing or stale.
    With `model`, it also holds that model's own compute calibration (measured once and stored)."""
    path = profile_path(disk_dir, home)
    prof = None
    if not refresh and path.is_file():
        try:
            prof = HardwareProfile.load(path)
        except ValueError:
            prof = None
        if prof is not None and (prof.version != PROFILE_VERSION or prof.age_s() >= max_age_s):
            prof = None
    if prof is None:
        prof = measure_profile(disk_dir, disk_bytes=disk_bytes, seconds_per_test=seconds_per_test)
        prof.save(path)
    if model is not None and model_key(model) not in prof.model_compute_scale:
        prof = calibrate_model(prof, model, seconds_per_test)
        prof.save(path)
    return prof


def calibrate_model(prof: HardwareProfile, model: OPTConfig, seconds_per_test: float = 0.25) -> HardwareProfile:
    """`prof` plus `model`'s own compute calibration (one layer and the head at its dimensions), when
    a layer and the head fit in a tenth of the free RAM; else `prof` unchanged (the generic scale)."""
    device = prof.compute_device
    dtype = _engine_dtype(prof.has_gpu)
    free = (torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available)
    if calibration_bytes(model, dtype) > free / 10:
        return prof
    scale = measure_compute_scale(prof, device, dtype,
                                  lambda fn: _timed(fn, 2 * seconds_per_test, _sync(device), best=True), model)
    return prof.replace(model_compute_scale={**prof.model_compute_scale, model_key(model): scale})


def _engine_dtype(has_gpu: bool) -> torch.dtype:
    """The engine's default compute dtype on this host (fp16 on CUDA; bf16 only on CPUs with native
    bf16 matmul, else fp32): the profile must time what the engine will run."""
    from engine.runtime.engine import resolve_dtype

    return resolve_dtype(None, torch.device("cuda" if has_gpu else "cpu"))


def measure_profile(disk_dir: str | Path, *, disk_bytes: int | None = None,
                    seconds_per_test: float = 0.25) -> HardwareProfile:
    disk_dir = Path(disk_dir)
    disk_bytes = disk_bytes or DEFAULT_DISK_BYTES
    disk_dir.mkdir(parents=True, exist_ok=True)
    has_gpu = torch.cuda.is_available()
    dtype = _engine_dtype(has_gpu)
    cpu_dtype = _engine_dtype(False)  # what CPU-side work (attention, RAM weights) runs in
    fields: dict = {}
    if has_gpu:
        write_gbps, read_gbps, method = measure_disk(disk_dir, disk_bytes)
    else:
        # Without a GPU the engine reads the disk while the same cores compute (virtio and the copy
        # out of the block layer need CPU too): measured here, reads under a matmul load ran at
        # 0.8 GB/s against 1.2-1.3 alone. The cost model needs what the engine will see.
        with _cpu_busy(dtype):
            write_gbps, read_gbps, method = measure_disk(disk_dir, disk_bytes)
        method += ", under compute load"
        fields["io_compute_interference"] = measure_io_interference(disk_dir, dtype, seconds_per_test)
    read_lat, sync_lat = measure_disk_latency(disk_dir, seconds_per_test)
    flops = {"cpu": {str(dt).removeprefix("torch."): matmul_flops("cpu", dt, seconds_per_test)
                     for dt in (torch.float32, torch.bfloat16)}}
    if has_gpu:
        flops["cuda"] = {str(dt).removeprefix("torch."): matmul_flops("cuda", dt, seconds_per_test)
                         for dt in (torch.float32, torch.bfloat16, torch.float16)}
        c2g, g2c = pinned_copy_gbps(seconds_per_test)
        props = torch.cuda.get_device_properties(0)
        fields.update(gpu_name=props.name, cpu_to_gpu_gbps=c2g, gpu_to_cpu_gbps=g2c,
                      gpu_mem_gbps=device_copy_gbps(seconds_per_test), gpu_mem_gib=props.total_memory / 2 ** 30)
    device = "cuda" if has_gpu else "cpu"
    prof = HardwareProfile(
        host=socket.gethostname(), source=f"measured by flexjob (torch {torch.__version__})",
        created_at=time.time(), disk_dir=str(disk_dir.resolve()), disk_read_method=method,
        compute_dtype=str(dtype).removeprefix("torch."),
        disk_read_gbps=read_gbps, disk_write_gbps=write_gbps, disk_read_latency_s=read_lat,
        disk_sync_latency_s=sync_lat,
        cpu_mem_gbps=weight_stream_gbps(seconds_per_test, dtype=cpu_dtype),
        cpu_attention_gbps=cpu_attention_gbps(seconds_per_test, dtype=cpu_dtype),
        dequant_gbps=dequant_gbps(device, dtype, seconds_per_test),
        convert_gbps=convert_gbps(dtype, seconds_per_test) if dtype != torch.float16 else 0.0,
        matmul_flops=flops, op_overhead_s=op_overhead_s(device, dtype),
        linear_s_per_byte=linear_table(device, dtype, seconds_per_test),
        cpu_mem_gib=psutil.virtual_memory().total / 2 ** 30,
        disk_free_gib=shutil.disk_usage(disk_dir).free / 2 ** 30, **fields)
    scale = measure_compute_scale(prof, device, dtype,
                                  lambda fn: _timed(fn, 2 * seconds_per_test, _sync(device), best=True))
    return prof.replace(compute_scale=scale)


@contextlib.contextmanager
def _cpu_busy(dtype: torch.dtype):
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
    stream their weights from memory and suffer most: on session 5's VM 0.59 at 32 rows against
    0.41 at 512; instrumented, the engine's decode lost ~0.6 s of compute per second of I/O."""
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
        alone = _timed(step, seconds)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        beside = _timed(step, seconds)
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


def measure_disk(disk_dir: Path, nbytes: int = DEFAULT_DISK_BYTES) -> tuple[float, float, str]:
    """(write GB/s with fsync, read GB/s with the page cache bypassed, how it was bypassed)."""
    nbytes = max(_CHUNK, nbytes // _CHUNK * _CHUNK)
    path = disk_dir.resolve() / f".flexjob-disk-probe-{os.getpid()}"
    buf = mmap.mmap(-1, _CHUNK)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(_CHUNK))  # incompressible
    try:
        write_s = _write_probe(path, nbytes, buf)
        read_s, method = _read_uncached(path, nbytes, buf)
        read_gbps = nbytes / read_s / 1e9
        settled = _settled_files(disk_dir.resolve(), nbytes)
        if settled and method == "O_DIRECT":
            # A file just written reads faster than the engine's files will (on session 5's VM
            # 2.4-3.7 GB/s against 1.7-2.1 for weight files written an hour before, back to back):
            # the host still caches what it was just sent. Read what the engine reads, if it is here.
            seconds = sum(_read_uncached(f, n, buf)[0] for f, n in settled)
            read_gbps = sum(n for _, n in settled) / seconds / 1e9
            method += ", files written earlier"
        return nbytes / write_s / 1e9, read_gbps, method
    finally:
        buf.close()
        path.unlink(missing_ok=True)


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
    """Median seconds of one 4 KiB uncached read and of one 4 KiB write + fdatasync."""
    path = disk_dir.resolve() / f".flexjob-latency-probe-{os.getpid()}"
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, buf)
        os.fsync(fd)

        def write_sync():
            os.pwrite(fd, buf, 0)
            os.fdatasync(fd)
        sync = _timed(write_sync, seconds / 2)
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
                read_lat = _timed(read, seconds / 2)
            except OSError:  # O_DIRECT accepted at open, refused at read (some filesystems)
                read_lat = 0.0
        finally:
            os.close(rfd)
        return read_lat, sync
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


def _timed(fn, seconds: float, sync=lambda: None, *, best: bool = False) -> float:
    """Median seconds per call of fn over about `seconds` (at least 3 calls) after a warm-up call;
    the median, because on a shared host a neighbour's burst should not set the figure. `best`:
    the fastest call instead, for figures that are compared with each other (the linear table and
    the engine-layer calibration): measured minutes apart on a busy host, medians of the two were
    seen 2x apart in either direction, fastest calls within 15 %. A call slower than the whole
    allowance is timed once (keeps the profile bounded on slow paths)."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if first >= seconds:
        return first
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def matmul_flops(device: str, dtype: torch.dtype, seconds: float = 0.25) -> float:
    """Dense FLOP/s of a linear layer in the engine's layout (weight [out, in]; F.linear), which on
    some CPUs is many times faster than a @ b of the same size in bf16."""
    n = 2048 if device == "cuda" else 1024
    x = torch.full((n, n), 0.5, device=device, dtype=dtype)
    w = torch.full((n, n), 0.01, device=device, dtype=dtype)
    with torch.inference_mode():
        return 2 * n ** 3 / _timed(lambda: torch.nn.functional.linear(x, w), seconds, _sync(device))


LINEAR_ROWS = (1, 8, 32, 128, 512, 2048)


def linear_table(device: str, dtype: torch.dtype, seconds: float = 0.25) -> dict[str, float]:
    """Seconds per weight byte of F.linear at several row counts, cycling through weights that do
    not fit in the caches. Measured here (bf16, 2 vCPU Zen4): 17 GB/s of weights at 1 row, 367
    GFLOP/s at 32 rows, 590 at 128, 1080 at 2048: a single peak FLOP/s and a single bandwidth
    (the roofline) predict a 32-row decode matmul twice too fast."""
    k, n = 2048, 8192
    weights = [torch.full((n, k), 0.01, device=device, dtype=dtype) for _ in range(8)]  # 8 x 32 MiB in bf16
    table = {}
    with torch.inference_mode():
        for rows in LINEAR_ROWS:
            x = torch.full((rows, k), 0.5, device=device, dtype=dtype)
            used = weights if rows < 512 else weights[:2]  # big row counts are compute-bound: fewer suffice

            def run(x=x, used=used):
                for w in used:
                    torch.nn.functional.linear(x, w)
            nbytes = sum(w.numel() * w.element_size() for w in used)
            table[str(rows)] = _timed(run, seconds, _sync(device), best=True) / nbytes
    return table


def weight_stream_gbps(seconds: float = 0.25, *, dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes/s a batch-1 linear layer on the CPU reads its weight at (beyond the caches)."""
    w = torch.full((8192, 4096), 0.01, dtype=dtype)  # values do not matter, filling fast does
    x = torch.full((1, 4096), 0.5, dtype=dtype)
    with torch.inference_mode():
        per = _timed(lambda: torch.nn.functional.linear(x, w), seconds)
    return w.numel() * w.element_size() / per / 1e9


def cpu_attention_gbps(seconds: float = 0.25, *, batch: int = 4, heads: int = 16, ctx: int = 512,
                       head_dim: int = 64, dtype: torch.dtype = torch.bfloat16) -> float:
    """KV-cache bytes/s of one decode attention step on the CPU (FlexGen's CPU delegation)."""
    q = torch.full((batch, heads, 1, head_dim), 0.1, dtype=dtype)
    k = torch.full((batch, heads, ctx, head_dim), 0.1, dtype=dtype)
    v = torch.full((batch, heads, ctx, head_dim), 0.1, dtype=dtype)

    def attend():  # the engine's kernel: a hand-written bf16 bmm + softmax was 60x slower on AVX2
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.inference_mode():
        per = _timed(attend, seconds)
    return 2 * k.numel() * k.element_size() / per / 1e9


def dequant_gbps(device: str, dtype: torch.dtype, seconds: float = 0.25, *, group: int = 64) -> float:
    """Output bytes/s of the engine's own 4-bit group-wise decompression (`compression.dequantize`
    into reused buffers, as `PlacedWeights` runs it) of opt-1.3b-sized MLP weights (8192 x 2048),
    alternating between two outputs as the engine's two buffer sets do: one 2048 x 2048 output
    that stays in the cache measured 6.6 GB/s where the engine got 2.5 (fp32, AVX2)."""
    from engine.runtime.compression import dequantize, quantize

    q = quantize(torch.rand(8192, 2048, device=device), num_bits=4, group_size=group)
    outs = [torch.empty(q.shape, dtype=dtype, device=device) for _ in range(2)]

    def run():
        for out in outs:
            dequantize(q, dtype, out=out)
    with torch.inference_mode():
        per = _timed(run, seconds, _sync(device))
    return sum(o.numel() * o.element_size() for o in outs) / per / 1e9


def convert_gbps(dtype: torch.dtype, seconds: float = 0.25) -> float:
    """Output bytes/s of converting fp16 weights (the store's format) to the compute dtype on the
    CPU; without F16C/AVX-512 paths this is slower than the disk read it follows."""
    src = torch.full((2 ** 23,), 0.5, dtype=torch.float16)
    # Into a kept buffer, as the engine converts (placed_weights: `_stream_buffers`): timing
    # `src.to(dtype)` counted the page faults of a fresh 32 MB tensor and read 1.8 GB/s where the
    # engine's copy runs at ~10 (opt-1.3b, fp32, AVX2 host), so streamed weights looked 5x dearer.
    out = torch.empty(src.shape, dtype=dtype)
    out_bytes = out.numel() * out.element_size()
    with torch.inference_mode():
        return out_bytes / _timed(lambda: out.copy_(src), seconds) / 1e9


def op_overhead_s(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Per-op cost of a decode step at a tiny size: a layer's sequence of ops (LayerNorm, q/k/v/out,
    attention, LayerNorm, fc1, ReLU, fc2) at hidden 256, batch 8, divided by its op count. Run as a
    sequence, like the engine does, it includes waking the kernels' threads between ops, which on a
    busy 2-core host costs milliseconds, far more than the dispatch itself."""
    F = torch.nn.functional
    x = torch.full((8, 1, 256), 0.5, device=device, dtype=dtype)
    w = torch.full((256, 256), 0.01, device=device, dtype=dtype)
    w1 = torch.full((1024, 256), 0.01, device=device, dtype=dtype)
    w2 = torch.full((256, 1024), 0.01, device=device, dtype=dtype)
    kv = torch.full((8, 4, 64, 64), 0.1, device=device, dtype=dtype)
    ln = torch.ones(256, device=device, dtype=dtype)

    def layer():
        h = F.layer_norm(x, (256,), ln, ln)
        q, _k, _v = F.linear(h, w), F.linear(h, w), F.linear(h, w)
        a = F.scaled_dot_product_attention(q.view(8, 1, 4, 64).transpose(1, 2), kv, kv)
        h = x + F.linear(a.transpose(1, 2).reshape(8, 1, 256), w)
        return h + F.linear(F.relu(F.linear(F.layer_norm(h, (256,), ln, ln), w1)), w2)
    with torch.inference_mode():
        return _timed(layer, 0.1, _sync(device)) / 11


def pinned_copy_gbps(seconds: float = 0.25) -> tuple[float, float]:
    """Host->device and device->host GB/s with pinned host memory (the engine's staging buffers)."""
    nbytes = 256 * 2 ** 20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    c2g = _timed(lambda: dev.copy_(host, non_blocking=True), seconds, torch.cuda.synchronize)
    g2c = _timed(lambda: host.copy_(dev, non_blocking=True), seconds, torch.cuda.synchronize)
    return nbytes / c2g / 1e9, nbytes / g2c / 1e9


def device_copy_gbps(seconds: float = 0.25) -> float:
    """Device memory bandwidth: a copy reads and writes each byte once."""
    nbytes = 512 * 2 ** 20
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / _timed(lambda: b.copy_(a), seconds, torch.cuda.synchronize) / 1e9
