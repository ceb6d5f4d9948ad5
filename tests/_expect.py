"""expecttest's TestCase, or, where expecttest is not installed (the GPU machine has
none and cannot install it), a TestCase whose tests skip: only the expect-tests of a
module skip, the module's other tests still run."""

import unittest

import torch

try:
    from expecttest import TestCase
except ImportError:

    class TestCase(unittest.TestCase):
        def setUp(self):
            self.skipTest("expecttest is not installed")


_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

pinned_on_2_14 = unittest.skipIf(_TORCH < (2, 14), "graph text pinned on torch 2.14; older releases order or decompose these nodes differently")
"""For an expect-test whose pinned text only torch 2.14's graph matches (the rewrite is
the same; the node order AOTAutograd gives the joint graph, or the decomposition, is not)."""

__all__ = ["TestCase", "pinned_on_2_14"]
