"""Benchmarks: they print numbers and assert nothing about time (see README, Benchmarks)."""
