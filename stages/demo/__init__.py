"""`pipe demo`: the whole pipeline on the built-in phantom data. See :mod:`stages.demo.stage`."""
from stages.demo.stage import DemoConfig, DemoResult, run

__all__ = ["DemoConfig", "DemoResult", "run"]
