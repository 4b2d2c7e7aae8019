"""`pipe reproduce`: a whole table of the paper, resumable. See :mod:`stages.reproduce.stage`."""
from stages.reproduce.stage import ReproduceConfig, ReproduceResult, run

__all__ = ["ReproduceConfig", "ReproduceResult", "run"]
