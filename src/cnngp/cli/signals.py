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
def deferred_interrupts(signals=(signal.SIGINT, signal.SIGTERM)):
    """A Ctrl-C (or SIGTERM) inside the block is recorded, not handled, and delivered again
    when the block ends, to the handler that was there before (which raises KeyboardInterrupt,
    or ``Terminated``). For imports of extensions that initialise in C++ and call back into
    Python: an exception surfacing in such a callback aborts the whole process (torch's
    start-up: ``terminate called after throwing an instance of 'pybind11::error_already_set'``,
    exit by SIGABRT, no message of ours). A signal being ignored (``SIG_IGN``: a background
    job of a shell script) stays ignored. Outside the main thread signals cannot be handled:
    no change."""
    pending = []

    def record(signum, frame):
        SIGNALS_SEEN.append(signum)
        pending.append(signum)

    previous = {}
    try:
        for signum in signals:
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # None: a handler set in C
                previous[signum] = signal.signal(signum, record)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pending:  # as if it arrived now: its own handler (or default action) takes it
        signal.raise_signal(pending[0])
