"""perf/comparison"""
