"""Benchmarks: bench/engine.py (in-process, no root) and bench/run.py (namespaces, root).

Both print figures and never judge them; see bench/README.md.
"""
