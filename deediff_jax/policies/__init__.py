"""The exit policies: one `ExitPolicy` object per policy, in one registry.

  from deediff_jax import policies
  policies.get(name)               # the policy object (attributes: docs/policies.md)
  policies.names()                 # registered names, in registration order
  policies.register(MyPolicy())    # a new policy: every mode, sweep and calibration picks it up

One module per family: uem.py (uem, uem_no_time), static.py, time_schedule.py, state_cosine.py,
none.py, adadiff.py, oracle.py. This package imports nothing else of deediff_jax.
"""
from deediff_jax.policies.base import (ExitPolicy, ScoreThreshold, UnknownPolicy, batch_score, compare, first,
                                       for_value, full_depth, get, learned_for, names, reference_batch_score,
                                       register, registered, unregister)

# The built-in policies, registered in the order every list of names shows them.
from deediff_jax.policies import uem  # noqa: E402,F401  (uem, uem_no_time)
from deediff_jax.policies import static  # noqa: E402,F401
from deediff_jax.policies import time_schedule  # noqa: E402,F401
from deediff_jax.policies import state_cosine  # noqa: E402,F401
from deediff_jax.policies import none  # noqa: E402,F401
from deediff_jax.policies import adadiff  # noqa: E402,F401
from deediff_jax.policies import oracle  # noqa: E402,F401

__all__ = ["ExitPolicy", "ScoreThreshold", "UnknownPolicy", "batch_score", "compare", "first", "for_value",
           "full_depth", "get", "learned_for", "names", "reference_batch_score", "register", "registered",
           "unregister"]
