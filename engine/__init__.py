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

# OpenMP's worker threads spin for a short while when a parallel region ends (GOMP_SPINCOUNT
# iterations, tens of microseconds), then sleep. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) woke a
# thread for every small operation: all in RAM on a 2-vCPU Xeon (bfloat16, opt-1.3b, 32x1) a decode
# step took 0.26-0.27 s against 0.23-0.24 s with this spin or spinning without end. Spinning without
# end (ACTIVE) keeps the cores from the engine's I/O thread, which reads weights and cache from disk
# between the compute thread's regions (2-vCPU Zen3, weights and cache on disk: a decode step 1.81-1.99 s
# against 1.65-1.79 s passive). libgomp reads these once, when torch loads it; a wait policy the user
# sets wins over the spin count.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
