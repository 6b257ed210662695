"""The official AdaDiff rule (model.exit_style=adadiff): exit when the mean of the per-pixel
confidence map exceeds the threshold. Among the in-blocks the first confident block only arms a
patience flag and the next confident one exits (exit.patience; the official image models: on,
their text model: off); the mid- and out-blocks exit at once. aggregate="mean" is exactly the
official batch rule; aggregate="all" decides per image (the official evaluation samples one image
per batch, so "all" reproduces its decisions). With classifier-free guidance the conditional and
null rows decide separately (each half on its own mean under "mean"), as the official code's two
separate network calls do."""
from deediff_jax.policies.uem import UEM
from deediff_jax.policies.base import ScoreThreshold, register


def _batch_mean(score, cfg_pairs: bool):
  """aggregate="mean": the batch mean, or with CFG pairs each half's own mean (per row)."""
  import jax.numpy as jnp
  if not cfg_pairs:
    return jnp.broadcast_to(jnp.mean(score), score.shape)
  half = score.shape[0] // 2
  means = jnp.stack([jnp.mean(score[:half]), jnp.mean(score[half:])])
  return jnp.repeat(means, half)


class AdaDiff(ScoreThreshold):
  name = "adadiff"
  summary = "AdaDiff: exit when the mean confidence > threshold, with patience among the in-blocks"
  score = "confidence"
  exits_when = "above"
  cheap_threshold = -1.0             # confidence > -1 always
  sweep_key = "confidence_thresholds"
  sweep_example = "0.85,0.9,0.95"
  calibratable = True
  threshold_at = (1.0, 0.0)          # confidence is in (0, 1): a = 0 never exits, a = 1 always
  monitor = "lte"
  needs_exit_style = "adadiff"
  learned = True
  replaces = UEM.name
  # Rows never wait for their CFG partner: the official code makes two separate network calls
  # (conditional, null), each exiting on its own confidence.
  pairs_decide_together = False

  def confident(self, s) -> tuple:
    import jax.numpy as jnp
    c = s.score("confidence")
    if s.aggregate == "mean":
      c = _batch_mean(c, s.cfg_pairs)
    over = c > s.thr
    # Patience among the in-blocks: the first confident in-block arms, the next one exits.
    in_block = (s.i < s.k) & s.pp["patience"]
    conf = jnp.where(in_block, over & s.armed, over)
    return conf, s.armed | (over & in_block)

  def reference_confident(self, r):
    import jax.numpy as jnp
    score = r.score("confidence")                                       # [N, B]
    if r.aggregate == "mean":
      halves = jnp.split(score, 2, axis=1) if r.cfg_pairs else [score]
      score = jnp.concatenate([jnp.broadcast_to(jnp.mean(h, 1, keepdims=True), h.shape) for h in halves], 1)
    over = score > r.thr
    k = r.k
    # Patience: an in-block exits only if an earlier in-block was already confident.
    seen_before = jnp.cumsum(over[:k].astype(jnp.int32), axis=0) - over[:k].astype(jnp.int32)
    patient = jnp.concatenate([over[:k] & (seen_before > 0), over[k:]], axis=0)
    return jnp.where(r.pp["patience"], patient, over)


register(AdaDiff())
