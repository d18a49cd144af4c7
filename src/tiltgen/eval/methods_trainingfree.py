"""Benchmark methods of training-free guidance and particle samplers (issue: training-free)."""
