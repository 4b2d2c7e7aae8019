"""The bottom layer: what every other package uses, importing nothing of the project's.

- :mod:`core.errors`: the exception types whose messages the CLI prints;
- :mod:`core.console`: the console, logging and progress that every stage shares;
- :mod:`core.atomic`: writes that are all or nothing (temporary name, fsync, rename);
- :mod:`core.locks`: ``flock`` locks, and run folders owned by one process at a time;
- :mod:`core.processes`: who this process is, and whether another one is still running.
"""
