"""flexjob's benchmarks: `python -m benchmarks --suite cpu|gpu` runs them all as one suite
(benchmarks/__main__.py); each bench_*.py script also runs on its own."""
