"""Benchmarks and report scripts (``python -m profiling.compare``, ``profiling/bench_*.py``,
``profiling/gpu_bench.sh``), built on the library's counters and timers in :mod:`compress.profile`."""
