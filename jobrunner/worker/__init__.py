"""One leased shard at a time: the worker loop, a shard's blocks, re-planning, fault hooks for tests."""
