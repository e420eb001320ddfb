"""How kernels get computed: the execution options every path takes (``execution``), the Gram
plan and its tile seam (``gram``), the fused CPU path
(``fused``, ``fused_kernels``), atomic files and checkpoints (``storage``) and the memory, disk
and time checks (``resources``). Imports the kernel maths, never the other way round."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("execution", "gram", "fused", "fused_kernels", "storage", "resources"))
