"""Files in and out: data sets (``data``), their preprocessing (``preprocess``: ZCA whitening),
JSON architecture specs (``spec``) and the named architectures (``architectures``)."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("data", "preprocess", "spec", "architectures"))
