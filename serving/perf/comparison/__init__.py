"""The serving benchmarks' library: served against in-process against naive
(``side_by_side``), the repository-settings sweep (``sweep``), where a request's CPU goes
(``cpu_split``), HTTP against gRPC latency (``classify_latency``); ``benchmarks/serving_*.py``
and ``benchmarks/classify_latency.py`` are their command lines."""
