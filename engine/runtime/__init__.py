"""How a model runs: the Engine, the zig-zag schedule, placement, tiers, KV cache, compression, budgets.

The runtime never imports `engine.planning`; it returns measurements for the planner to learn from.
"""
