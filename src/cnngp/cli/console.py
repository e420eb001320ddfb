"""The ``cnngp`` console script's first module: nothing but ``os`` and ``sys`` (loaded with the
interpreter), so that a Ctrl-C at any moment of start-up, even while the command-line module
itself is being imported, ends with one line and exit status 130, never a traceback.

A Ctrl-C is *recorded* here as well as raised: an extension module being initialised when it
arrives may replace the KeyboardInterrupt by an unrelated error with no link to it (numpy's
``PyCapsule_Import could not import module "datetime"`` is one), so :func:`cnngp.cli.main.main`
asks :func:`interrupted` rather than only walking the exception's chain."""

import os
import sys

#: Signal numbers received since start-up (SIGINT here, SIGTERM by ``main``).
SIGNALS_SEEN: list = []


def record_and_interrupt(signum, frame):
    """SIGINT handler: Python's own (raise KeyboardInterrupt), remembering that it happened."""
    SIGNALS_SEEN.append(signum)
    raise KeyboardInterrupt


def interrupted() -> int | None:
    """The last signal received (2 = SIGINT, 15 = SIGTERM), or None."""
    return SIGNALS_SEEN[-1] if SIGNALS_SEEN else None


def entry() -> None:  # pragma: no cover - exercised by the subprocess tests
    try:
        import signal

        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, record_and_interrupt)
        from cnngp.cli.main import entry as run
    except KeyboardInterrupt:
        sys.stderr.write("cnngp: interrupted; no output written\n")
        sys.stderr.flush()
        os._exit(130)
    run()
