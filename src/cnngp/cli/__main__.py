"""``python -m cnngp.cli``: the same as the ``cnngp`` command."""

from cnngp.cli.console import entry

entry()
