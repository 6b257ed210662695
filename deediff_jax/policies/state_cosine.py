"""CALM-style state saturation: exit when the hidden state stops changing, cos(h_i, h_{i-1}) >
threshold (never at layer 1). Needs no trained exit signal, only exit heads."""
from deediff_jax.policies.base import ScoreThreshold, register


class StateCosine(ScoreThreshold):
  name = "state_cosine"
  summary = "CALM-style: exit when cos(h_i, h_{i-1}) > threshold (never at layer 1)"
  score = "cosine"
  exits_when = "above"
  negative_thresholds = True         # cosines may be negative
  cheap_threshold = -2.0             # cos > -2 always
  sweep_key = "cosine_thresholds"
  sweep_example = "0.9,0.95,0.99"
  calibratable = True
  threshold_at = (1.0, -1.0)         # a = 0: cos > 1 never; a = 1: cos > -1 (almost) always
  monitor = "cosine"

  def confident(self, s) -> tuple:
    conf, armed = super().confident(s)
    return conf & (s.layer > 1), armed

  def reference_confident(self, r):
    return super().reference_confident(r) & (r.layers > 1)


register(StateCosine())
