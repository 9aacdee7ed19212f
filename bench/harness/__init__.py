"""Pieces of the benchmark harness driven by ``bench/run.py``."""
