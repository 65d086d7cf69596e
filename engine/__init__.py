"""flexjob's offloading OPT engine: placement across GPU/CPU/disk, zig-zag block schedule, LP policy."""
