"""The one exception type users catch: every input problem raises :class:`CNNGPError`."""

__all__ = ["CNNGPError", "MissingFileError"]


class CNNGPError(ValueError):
    """Invalid input or configuration. The message names the argument and what is accepted."""


class MissingFileError(CNNGPError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""
