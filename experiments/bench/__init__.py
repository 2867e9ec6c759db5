"""Benchmarks and load runs: scripts run by hand, their numbers reported in the README."""
