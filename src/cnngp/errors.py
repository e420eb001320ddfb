"""The one exception type users catch: every input problem raises :class:`CNNGPError`."""

__all__ = ["CNNGPError"]


class CNNGPError(ValueError):
    """Invalid input or configuration. The message names the argument and what is accepted."""
