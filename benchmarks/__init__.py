"""Cost benchmarks of deq_attacks: every figure is a ratio of two runs timed side by side.

Run ``python -m benchmarks.run`` from the repository root (see ``benchmarks/run.py``).
"""
