"""Performance tooling: ``medimg bench`` and ``medimg tune-server`` (bench, tune_server), the
perf_analyzer load generator, CPU accounting, and the serving benchmarks' library
(``comparison``, driven by the scripts in ``benchmarks/``)."""
