"""The oracle (evaluation only): every block runs and each sample takes its first layer whose x0
is within `threshold` (RMS, x0 units) of the final layer's x0. It saves nothing; its cost is the
depth it would stop at: the ceiling of any exit policy on the model."""
from deediff_jax.policies.base import ExitPolicy, register


def oracle_exits(eps_all, x0_scale, tolerance, min_layers=1):
  """First layer (0-based) per sample whose x0 is within `tolerance` RMS of the last layer's.

  eps_all [N, B, H, W, C]; x0 = (x - sigma eps) / alpha, so the x0 distance of two predictions
  from the same x is (sigma / alpha) |eps_i - eps_N|. x0_scale: sigma/alpha, scalar or [B].
  """
  import jax.numpy as jnp
  n, b = eps_all.shape[:2]
  scale = jnp.broadcast_to(jnp.asarray(x0_scale, jnp.float32), (b,))
  rms = jnp.sqrt(jnp.mean(jnp.square(eps_all - eps_all[-1:]), axis=(2, 3, 4))) * scale[None]   # [N, B]
  layers = jnp.arange(1, n + 1)[:, None]
  conf = ((rms <= tolerance) & (layers >= min_layers)) | (layers == n)
  return jnp.argmax(conf, axis=0)


class Oracle(ExitPolicy):
  name = "oracle"
  summary = "evaluation only: each sample's first layer whose x0 is within threshold (RMS) of the final layer's"
  value = "threshold"
  cheap_threshold = 1e30             # every layer within tolerance
  sweep_key = "oracle_tolerances"
  sweep_example = "0.01,0.03,0.1"
  runnable = False
  runs_every_block = True
  needs_x0_scale = True

  def first_exits(self, eps_all, x0_scale, pp):
    return oracle_exits(eps_all, x0_scale, pp["threshold"], pp["min_layers"])


register(Oracle())
