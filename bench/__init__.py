"""Benchmarks against the peers (lightly): throughput, quality at equal budget, data path, pipeline overhead.

Only this package imports the peers; the project's code (flows, stages, ssl_models) never does.
"""
