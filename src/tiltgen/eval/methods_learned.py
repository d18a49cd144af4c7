"""Benchmark methods of the learned guidance network (issue: learned guidance)."""
