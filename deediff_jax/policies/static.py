"""A fixed depth: every sample exits after exactly `depth` blocks."""
from deediff_jax.policies.base import ExitPolicy, register


class Static(ExitPolicy):
  name = "static"
  summary = "exit after exactly `depth` blocks (exit.depth; 0 = all)"
  value = "depth"

  def confident(self, s) -> tuple:
    import jax.numpy as jnp
    return jnp.broadcast_to(s.layer >= s.pp["depth"], (s.b,)), s.armed

  def reference_confident(self, r):
    return r.layers >= r.pp["depth"]


register(Static())
