"""Which signals the ``cnngp`` command has received (standard library only).

A Ctrl-C is *recorded* as well as raised: an extension module being initialised when it arrives
may replace the KeyboardInterrupt by an unrelated error with no link to it (numpy's
``PyCapsule_Import could not import module "datetime"`` is one), so :func:`cnngp.cli.main.main`
asks :func:`interrupted` rather than only walking the exception's chain. The console script
installs :func:`record_and_interrupt` before anything else is imported; ``main`` records SIGTERM
and imports torch inside :func:`deferred_interrupts`.
"""

import contextlib
import signal

#: Signal numbers received since the command started (SIGINT, SIGTERM).
SIGNALS_SEEN: list = []


def record_and_interrupt(signum, frame):
    """SIGINT handler: Python's own (raise KeyboardInterrupt), remembering that it happened."""
    SIGNALS_SEEN.append(signum)
    raise KeyboardInterrupt


def interrupted() -> int | None:
    """The last signal received (2 = SIGINT, 15 = SIGTERM), or None."""
    return SIGNALS_SEEN[-1] if SIGNALS_SEEN else None


@contextlib.contextmanager
def deferred_interrupts():
    """A Ctrl-C inside the block is recorded, not raised, and raised as KeyboardInterrupt when
    the block ends. For imports of extensions that initialise in C++ and call back into Python:
    a KeyboardInterrupt surfacing in such a callback aborts the whole process (torch's start-up:
    ``terminate called after throwing an instance of 'pybind11::error_already_set'``, exit by
    SIGABRT, no message of ours). Outside the main thread signals cannot be handled: no change."""
    pending = []

    def record(signum, frame):
        SIGNALS_SEEN.append(signum)
        pending.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, record)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
