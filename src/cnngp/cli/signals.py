"""Which signals the ``cnngp`` command has received (standard library only).

A Ctrl-C is *recorded* as well as raised: an extension module being initialised when it arrives
may replace the KeyboardInterrupt by an unrelated error with no link to it (numpy's
``PyCapsule_Import could not import module "datetime"`` is one), so :func:`cnngp.cli.main.main`
asks :func:`interrupted` rather than only walking the exception's chain. The console script
installs :func:`record_and_interrupt` before anything else is imported; ``main`` records SIGTERM.
"""

#: Signal numbers received since the command started (SIGINT, SIGTERM).
SIGNALS_SEEN: list = []


def record_and_interrupt(signum, frame):
    """SIGINT handler: Python's own (raise KeyboardInterrupt), remembering that it happened."""
    SIGNALS_SEEN.append(signum)
    raise KeyboardInterrupt


def interrupted() -> int | None:
    """The last signal received (2 = SIGINT, 15 = SIGTERM), or None."""
    return SIGNALS_SEEN[-1] if SIGNALS_SEEN else None
