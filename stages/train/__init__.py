"""Stage two: `pipe train-adaptor`. See :mod:`stages.train.trainer`."""
from stages.train.trainer import TrainConfig, TrainResult, load_training_data, run

__all__ = ["TrainConfig", "TrainResult", "load_training_data", "run"]
