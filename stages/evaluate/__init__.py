"""Stage three: `pipe evaluate`. See :mod:`stages.evaluate.stage`."""
from stages.evaluate.stage import EvalConfig, EvalResult, run

__all__ = ["EvalConfig", "EvalResult", "run"]
