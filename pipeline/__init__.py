"""The libraries the stages share: configs, devices, imaging, encoders, datasets, models, the API.

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already chooses a
policy, before torch loads its OpenMP runtime: idle OpenMP threads then sleep instead of
spinning, which on a machine shared with other jobs made small training steps 10-20x
faster with two threads (see ``pipeline/threads.py`` and ``bench/threads.py``). The
command line (``cli/__init__.py``) sets the same default before any command imports torch.
"""
import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
