"""kvmeter benchmarks: every figure measured side by side with its baseline in the same run.

`make bench` (or `python -m bench [--quick]` as root from the repository root) prints a table and
writes bench/results.json. Absolute times drift on shared machines; the ratios are what to read.
"""
