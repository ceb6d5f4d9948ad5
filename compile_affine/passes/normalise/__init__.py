"""Normalisation: forms the generic recognition cannot see (an eval-mode batch norm, an
addcmul's unit factor, a ``Dropout(p=0)`` clone) rewritten value for value into the
generic one before any site is found. ``steps.STEPS`` runs them in order; ``batchnorm``
finds and rewrites the batch-norm chains, ``forms`` the other two.
"""
