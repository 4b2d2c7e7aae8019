"""Stage two: `pipe train-adaptor`. See :mod:`stages.train.trainer`.

The trainer is imported on first use of what it exports, so the light residency registry
(:mod:`stages.train.residency`) can be read without importing torch (`pipe --help` lists it).
"""
from __future__ import annotations

__all__ = ["TrainConfig", "TrainResult", "load_training_data", "run"]


def __getattr__(name: str):
    if name in __all__:
        from stages.train import trainer  # lazy: the trainer imports torch; the residency registry must not

        return getattr(trainer, name)
    raise AttributeError(f"module 'stages.train' has no attribute {name!r}")
