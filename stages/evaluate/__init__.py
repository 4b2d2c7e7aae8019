"""Stage three: `pipe evaluate`. See :mod:`stages.evaluate.stage`.

The stage is imported on first use of ``EvalConfig``, ``EvalResult`` or ``run``, so the
light task registry (:mod:`stages.evaluate.tasks`) can be read without importing torch.
"""
from __future__ import annotations

__all__ = ["EvalConfig", "EvalResult", "run"]


def __getattr__(name: str):
    if name in __all__:
        from stages.evaluate import stage  # lazy: the stage imports torch; the task registry must not

        return getattr(stage, name)
    raise AttributeError(f"module 'stages.evaluate' has no attribute {name!r}")
