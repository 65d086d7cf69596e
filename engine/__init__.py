"""flexjob's offloading OPT engine: placement across GPU/CPU/disk, zig-zag block schedule, LP policy."""
import os

# Tensors of 2 MiB and more get transparent huge pages: PyTorch's CPU allocator asks for them
# (madvise) when THP_MEM_ALLOC_ENABLE is set, which it reads once, at its first allocation, so it
# is set here, before torch loads. Under a tight memory budget the engine returns every freed
# block of over 1 MiB to the kernel (budgets.configure_allocator), so each of a prefill's
# intermediates (16-64 MiB per linear layer at 32 rows x 128 positions of opt-1.3b) is faulted in
# anew in every layer; on 4 KiB pages that made a 32-row bf16 prefill 26.7 s against 20.1 s on
# huge pages (2-vCPU Zen4, --cpu-mem 4, same peak RSS). Set it to 0 to keep 4 KiB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# OpenMP's worker threads sleep when a parallel region ends instead of spinning for it: the engine's
# I/O thread (weight and cache reads, cache writes and their syncs) shares the cores with the
# compute thread's team, and spinning workers kept it off a core, so the team's next region waited
# for it. Read once, when torch loads libgomp. On a 2-vCPU AVX2 host (float32, 6-layer opt-1.3b,
# weights and cache on disk, 16x4) a decode step took 1.65-1.79 s against 1.81-1.99 s spinning; all
# in RAM (32x1) 0.34-0.40 s against 0.36-0.45 s, with the same ids. Set it to ACTIVE to spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
