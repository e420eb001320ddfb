"""The ``cnngp`` console script's first module: nothing but ``os`` and ``sys`` (loaded with the
interpreter), so that a Ctrl-C at any moment of start-up, even while the command-line module
itself is being imported, ends with one line and exit status 130, never a traceback. Ctrl-C is
recorded from here on (:mod:`cnngp.cli.signals`), so that an extension that swallows it during
its import still ends as an interrupt."""

import os
import sys


def entry() -> None:  # pragma: no cover - exercised by the subprocess tests
    try:
        import signal

        from cnngp.cli import signals

        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signals.record_and_interrupt)
        from cnngp.cli.main import entry as run
    except KeyboardInterrupt:
        sys.stderr.write("cnngp: interrupted; no output written\n")
        sys.stderr.flush()
        os._exit(130)
    run()
