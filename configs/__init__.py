"""freeze-pipe's data files, shipped as package data and read through :mod:`importlib.resources`
(see :mod:`pipeline.resources`): training presets (``*.yaml``), zero-shot prompts (``prompts/``),
the paper's tables and their evaluation recipes (``paper/``) and the sweep example. No code."""
