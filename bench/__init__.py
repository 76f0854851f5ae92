"""Benchmarks that show where the time goes.

- ``python -m bench.pipeline``: each stage alone, the threaded pipeline, and a plain sequential
  loop on the same frames; efficiency (pipeline / slowest stage) and speedup (pipeline /
  sequential).
- ``python -m bench.soak``: a live source for minutes; RSS and latency p95 slopes.

Results and the commands that made them: ``bench/RESULTS.md``.
"""
