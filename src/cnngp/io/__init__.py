"""Files in and out: data sets (``data``), JSON architecture specs (``spec``), the named
architectures (``architectures``) and what results record about how they were made
(``provenance``)."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("data", "spec", "architectures", "provenance"))
