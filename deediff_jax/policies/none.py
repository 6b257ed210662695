"""Full depth through the early-exit loop (no exit): the loop's own overhead, and the full-depth row."""
from deediff_jax.policies.base import ExitPolicy, register


class NoExit(ExitPolicy):
  name = "none"
  summary = "full depth (through the same loop)"
  needs_exits = False
  full_depth = True

  def confident(self, s) -> tuple:
    import jax.numpy as jnp
    return jnp.zeros((s.b,), bool), s.armed

  def reference_confident(self, r):
    import jax.numpy as jnp
    return jnp.zeros((r.n, r.b), bool)


register(NoExit())
