"""What this machine can give a job, and the check every command makes before it allocates.

A command estimates its memory, disk and time from the plan alone (for a Gram matrix,
:func:`cnngp.engine.gram.estimate_cost`), then calls :func:`check_job`: a job that cannot fit in
the memory or disk this machine has left is refused with the numbers and a remedy, and a
job longer than ``CNNGP_LONG_JOB_SECONDS`` (default one hour) starts only with ``--yes``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from cnngp.errors import CNNGPError
from cnngp.settings import env_number

__all__ = ["available_memory", "free_disk", "check_job", "human_bytes", "human_seconds",
           "LONG_JOB_SECONDS"]

#: a job estimated to run longer than this (seconds) needs an explicit --yes
LONG_JOB_SECONDS = env_number("CNNGP_LONG_JOB_SECONDS", 3600.0, 0)
#: fraction of the available memory a job may plan to use
MEMORY_FRACTION = 0.9


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get now: MemAvailable, capped by a cgroup
    limit when there is one; None where neither can be read."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        room = max(0, limit - used)
        avail = room if avail is None else min(avail, room)
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return int(avail)


def free_disk(path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "forever"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def check_job(
    what: str,
    *,
    memory_bytes: float = 0,
    seconds: float | None = None,
    disk_bytes: float = 0,
    disk_path=None,
    yes: bool = False,
    remedy: str = "",
) -> None:
    """Refuse, with the numbers, a job this machine cannot hold, or a long one without --yes.

    Parameters
    ----------
    what : str
        The job and the argument that sizes it, e.g. ``"--x1 (5120 images)"``.
    memory_bytes, disk_bytes : float
        Estimated peak memory, and bytes written under ``disk_path``.
    seconds : float, optional
        Estimated run time; over :data:`LONG_JOB_SECONDS` needs ``yes``.
    remedy : str
        What to change, appended to the message.
    """
    tail = f"; {remedy}" if remedy else ""
    avail = available_memory()
    if avail is not None and memory_bytes > MEMORY_FRACTION * avail:
        raise CNNGPError(
            f"{what}: needs about {human_bytes(memory_bytes)} of memory but this machine has "
            f"{human_bytes(avail)} available{tail}"
        )
    if disk_bytes and disk_path is not None:
        free = free_disk(disk_path)
        if free is not None and disk_bytes > free:
            raise CNNGPError(
                f"{what}: writes about {human_bytes(disk_bytes)} but {str(disk_path)!r} has "
                f"{human_bytes(free)} free{tail}"
            )
    if seconds is not None and seconds > LONG_JOB_SECONDS and not yes:
        raise CNNGPError(
            f"{what}: would take about {human_seconds(seconds)} on this machine (over "
            f"{human_seconds(LONG_JOB_SECONDS)}); pass --yes to start it anyway{tail}"
        )

