"""Benchmarks of the CLIP service: figures, never tests. See bench/README.md."""
