"""Tuning knobs read from the environment (documented in README.md and benchmarks/README.md),
and :class:`Settings`, what the frozen dataclasses of settings (a sweep's or learn's protocol)
share.

A value that is not a number in range does not stop an import half-way: it is reported with a
warning that names the variable, and the default is used.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

__all__ = ["env_number", "Settings"]


class Settings:
    """For a frozen dataclass of settings: :meth:`names` and a :meth:`replace` that refuses
    unknown names (``KIND`` says what a name is not, in that message)."""

    KIND = "setting"

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes):
        """A copy with ``changes`` (validated as on construction)."""
        unknown = [k for k in changes if k not in self.names()]
        if unknown:
            from cnngp.errors import CNNGPError

            raise CNNGPError(f"{', '.join(unknown)}: not a {self.KIND}; accepted: {', '.join(self.names())}")
        return dataclasses.replace(self, **changes)


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
