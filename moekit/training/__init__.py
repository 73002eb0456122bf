"""Training: the run config tree, the loop, validation, checkpoints, metrics and plots."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ParallelConfig, RunConfig, TrainConfig, run_config_from_dict, with_overrides
from .evaluate import evaluate
from .runs import evaluate_run, load_run
from .trainer import TrainResult, train, train_step

__all__ = ["RunConfig", "TrainConfig", "ParallelConfig", "run_config_from_dict", "with_overrides", "train",
           "train_step", "TrainResult", "evaluate", "evaluate_run", "load_run", "CheckpointError",
           "save_checkpoint", "load_checkpoint"]
