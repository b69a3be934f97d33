"""Benchmarks (training, serving, precompute, storage, clustering): one idea per module."""
