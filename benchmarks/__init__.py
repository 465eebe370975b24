"""SpikeStream benchmarks: ``python -m benchmarks.run`` (``make bench``).

Modules: :mod:`benchmarks.common` (timing harness, result rows, table/JSON/PNG),
``bench_*`` (one per part of the issue), :mod:`benchmarks.peers` (the peer networks).
Profiling notes live in ``benchmarks/README.md``.
"""
