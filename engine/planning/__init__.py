"""How best to run a model: hardware profile, profiler, calibration, cost model, the LP planner."""
