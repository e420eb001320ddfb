"""The ``cnngp`` console script's first module: nothing but ``os`` and ``sys`` (loaded with the
interpreter), so that a Ctrl-C at any moment of start-up, even while the command-line module
itself is being imported, ends with one line and exit status 130, never a traceback."""

import os
import sys


def entry() -> None:  # pragma: no cover - exercised by the subprocess tests
    try:
        from cnngp.cli.main import entry as run
    except KeyboardInterrupt:
        sys.stderr.write("cnngp: interrupted; no output written\n")
        sys.stderr.flush()
        os._exit(130)
    run()
