"""Tuning knobs read from the environment (documented in README.md and benchmarks/README.md).

A value that is not a number in range does not stop an import half-way: it is reported with a
warning that names the variable, and the default is used.
"""

from __future__ import annotations

import math
import os
import warnings

__all__ = ["env_number"]


def env_number(name: str, default: float, minimum: float = 0.0, integer: bool = False):
    """The number in environment variable ``name`` (≥ ``minimum``, finite), else ``default``."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        warnings.warn(
            f"{name}={raw!r} is not a finite number >= {minimum:g}; using the default {default}",
            RuntimeWarning,
            stacklevel=2,
        )
        return default
    return int(value) if integer else value
