"""Benchmarks: decode step times against the hardware floor, workloads, routing replays."""
