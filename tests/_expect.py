"""expecttest's TestCase, or, where expecttest is not installed (the GPU machine has
none and cannot install it), a TestCase whose tests skip: only the expect-tests of a
module skip, the module's other tests still run."""

import unittest

try:
    from expecttest import TestCase
except ImportError:

    class TestCase(unittest.TestCase):
        def setUp(self):
            self.skipTest("expecttest is not installed")


__all__ = ["TestCase"]
