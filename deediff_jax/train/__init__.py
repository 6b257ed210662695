"""Training: state/optimizer/EMA, mesh and sharding rules, orbax checkpoints, the loop, metrics."""
from deediff_jax.train.checkpoint import CheckpointError, export_params, load_params
from deediff_jax.train.trainer import TrainingDivergedError, train

__all__ = ["CheckpointError", "TrainingDivergedError", "export_params", "load_params", "train"]
