"""Benchmark CLI (``python -m compile_affine.bench``) and the measurements it shares with the tests."""
