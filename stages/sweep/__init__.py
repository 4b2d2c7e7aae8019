"""`pipe sweep`: many Adaptor trainings from one cache, searched (grid, random, Optuna), run in
parallel on Dask, chosen by downstream figures on the validation split. See :mod:`stages.sweep.stage`."""
from stages.sweep.spec import SweepSpec, load_sweep
from stages.sweep.stage import SweepResult, run

__all__ = ["SweepResult", "SweepSpec", "load_sweep", "run"]
