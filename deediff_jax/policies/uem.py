"""DeeDiff's learned exit: exit when the uncertainty estimate u of the layer's UEM is below the
threshold (u is in (0, 1)). `uem_no_time` is the same rule for a model whose UEM has no time input."""
from deediff_jax.policies.base import ScoreThreshold, register


class UEM(ScoreThreshold):
  name = "uem"
  summary = "DeeDiff: exit when the UEM's u < threshold (the UEM kind is the model's own)"
  score = "uncertainty"              # u of the model's UEM
  exits_when = "below"
  cheap_threshold = 2.0              # u < 2 always
  sweep_key = "thresholds"
  sweep_example = "0.05,0.1,0.2"
  calibratable = True
  threshold_at = (0.0, 1.0)          # a = 0: u < 0 never; a = 1: u < 1 always
  monitor = "uncertainty"
  needs_exit_style = "deediff"
  learned = True


class UEMNoTime(UEM):
  name = "uem_no_time"
  summary = "uem for a model trained with model.uem=token_linear_no_time (a UEM without the time token)"
  needs_uem = "token_linear_no_time"


register(UEM())
register(UEMNoTime())
