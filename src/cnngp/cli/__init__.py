"""The ``cnngp`` command: a thin layer over the library. ``console`` is the entry point,
``main`` the parser, the contract every command follows and the ``kernel``/``info`` commands;
``sweep`` and ``montecarlo`` add their commands. Importing this package imports nothing else."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("main", "console", "signals", "sweep", "montecarlo"))
