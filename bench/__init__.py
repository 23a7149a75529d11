"""Benchmarks: each scenario runs the systems it compares side by side, in one process run,
interleaved, several times, and reports medians and ratios. See ``python -m bench --help``."""
