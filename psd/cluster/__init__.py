"""Cluster logic with no I/O: key ranges, the range assignment, liveness."""
