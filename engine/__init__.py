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
