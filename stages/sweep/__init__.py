"""`pipe sweep`: a grid of Adaptor trainings against the same caches. See :mod:`stages.sweep.stage`."""
from stages.sweep.stage import SweepResult, SweepSpec, load_sweep, run

__all__ = ["SweepResult", "SweepSpec", "load_sweep", "run"]
