"""expecttest's TestCase, or, where expecttest is not installed (the GPU machine has
none and cannot install it), a TestCase whose tests skip: only the expect-tests of a
module skip, the module's other tests still run."""

import unittest

from compile_affine._compat import TORCH_MINOR

try:
    from expecttest import TestCase
except ImportError:

    class TestCase(unittest.TestCase):
        def setUp(self):
            self.skipTest("expecttest is not installed")


pinned_on_2_14 = unittest.skipIf(TORCH_MINOR < (2, 14), "graph text pinned on torch 2.14; older releases order or decompose these nodes differently")
"""For an expect-test whose pinned text only torch 2.14's graph matches (the rewrite is
the same; the node order AOTAutograd gives the joint graph, or the decomposition, is not)."""

__all__ = ["TestCase", "pinned_on_2_14"]
