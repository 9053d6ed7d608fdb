"""Benchmarks: echonode beside the tool a user would pick instead, one interleaved run, ratios printed.

Run from the repository root as ``python -m bench.NAME`` (``.venv/bin/python -m bench.receive``);
each prints the machine (CPU model and flags, bench/machine.py) beside its figures.
"""
