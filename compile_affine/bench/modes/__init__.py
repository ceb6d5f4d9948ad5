"""The benchmark's modes (a few share a module): ``python -m compile_affine.bench MODE``."""
