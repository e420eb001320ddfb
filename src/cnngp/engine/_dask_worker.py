"""Preloaded into each local Dask worker process (``LocalCluster(preload=[...])``).

Ctrl-C reaches every process of the terminal's process group: a worker that took it printed a
KeyboardInterrupt traceback (and, once the scheduler was gone, heartbeat errors) under cnngp's
one-line message. The main process alone handles the interrupt and closes the cluster, which
ends the workers; they ignore SIGINT and keep their logging quiet (``CNNGP_DEBUG=1`` keeps it).
"""

from __future__ import annotations

import logging
import os
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
if not os.environ.get("CNNGP_DEBUG"):
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def dask_setup(worker) -> None:  # the preload hook Dask calls; the work is done at import
    pass
