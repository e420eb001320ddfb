"""Preloaded into each local Dask worker process (``LocalCluster(preload=[...])``).

Ctrl-C reaches every process of the terminal's process group: a worker that took it printed a
KeyboardInterrupt traceback (and, once the scheduler was gone, heartbeat errors) under cnngp's
one-line message. The main process alone handles the interrupt and closes the cluster, which
ends the workers; they ignore SIGINT and keep their logging quiet (``CNNGP_DEBUG=1`` keeps it).

Nothing happens at import: importing this module elsewhere (pytest's doctest collection, a
user's tooling) must not make that process ignore Ctrl-C — and the processes it starts, which
inherit an ignored SIGINT. Dask calls :func:`dask_setup` in the worker process itself.
"""

from __future__ import annotations

import logging
import os
import signal


def dask_setup(worker) -> None:
    """The preload hook Dask calls when the worker starts (in the worker's own process)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the process's main thread: Ctrl-C then stays the default
        pass
    if not os.environ.get("CNNGP_DEBUG"):
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
