"""ASE-style depth schedule: a depth per timestep bucket (first entry = the noisiest bucket)."""
from deediff_jax.policies.base import ExitPolicy, register


class TimeSchedule(ExitPolicy):
  name = "time_schedule"
  summary = "a depth per timestep bucket, noisiest bucket first (exit.schedule, e.g. '3,5,9')"
  value = "schedule"

  def confident(self, s) -> tuple:
    return s.layer >= s.sched_depth, s.armed

  def reference_confident(self, r):
    return r.layers >= r.sched_depth[None]


register(TimeSchedule())
