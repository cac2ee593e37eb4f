"""Measuring dense networks: the per-patch oracle, baselines, mode comparison, frontier, cost."""
