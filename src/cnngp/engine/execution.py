"""How to compute: the one set of execution options every kernel path takes.

:class:`Execution` holds what decides *how* a kernel is computed — precision, device, engine,
batching, memory, progress, checkpoints and, for the tiled store, workers, scheduler, tile,
archive and the store it reuses — and never *what* is computed (the network, the images, ``get``, ``flip``, readouts). The
command line builds one per command (:func:`cnngp.cli.main.execution_from_args`); the library
functions take ``execution=`` and/or the same names as keywords::

    cnngp.kernel(net, x, dtype="float32")                       # keywords, as always
    ex = cnngp.Execution(dtype="float32", engine="torch")
    cnngp.kernel(net, x, execution=ex)                          # one object, passed around
    cnngp.readout_sweep(body, readouts, x, execution=ex, progress=True)  # keywords override it

The options are documented once, in :class:`Execution` (and README, "Execution options").
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

from cnngp.errors import CNNGPError

__all__ = ["Execution", "ENGINES", "resolve_engine", "COMPUTE", "RESUME", "STORE"]

#: the engines a Gram computation can run on (see :func:`resolve_engine`)
ENGINES = ("auto", "fused", "torch", "triton")

#: options of every kernel computation
COMPUTE = ("dtype", "device", "engine", "batch_size", "memory_budget", "progress")
#: options of an in-memory computation that saves its progress (kernel, readout_sweep, offset_sums)
RESUME = ("checkpoint", "keep_checkpoint")
#: options of the tiled kernel store (store_kernel, the sweep's and learn's stores)
STORE = ("store", "archive", "reuse", "workers", "scheduler", "tile", "threads")


def resolve_engine(engine, device, dtype=None) -> str:
    """The engine that computes the layers: ``"fused"`` (the numba CPU kernels of
    :mod:`cnngp.engine.fused`, declining layers they do not handle to torch), ``"torch"`` (every
    layer's own ``propagate``: the reference), or ``"triton"`` (the fused GPU kernels);
    ``"auto"`` picks ``"fused"`` on a CPU and ``"torch"`` elsewhere."""
    import torch

    if engine is None:
        engine = "auto"
    if not isinstance(engine, str) or engine not in ENGINES:
        raise CNNGPError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    device = torch.device(device)
    if engine == "auto":
        return "fused" if device.type == "cpu" else "torch"
    if engine == "fused" and device.type != "cpu":
        raise CNNGPError(f"engine: 'fused' runs on the CPU only, not on device {str(device)!r}; "
                         "use engine 'triton' or 'torch' there")
    if engine == "triton":  # triton installed, and a CUDA device (or its CPU interpreter)
        from cnngp.engine import gpu  # imports triton only now

        gpu.require(device)
    return engine


def _positive_int(name: str, value, what: str = "an int >= 1"):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) and not _is_np_int(value) or value < 1:
        raise CNNGPError(f"{name}: expected {what} or None, got {value!r}")
    return int(value)


def _is_np_int(value) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - a declared dependency
        return False
    return isinstance(value, np.integer)


def _path(name: str, value):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(os.fspath(value)).strip():
        raise CNNGPError(f"{name}: expected a path (str or os.PathLike) or None, got {value!r}")
    return value


@dataclass(frozen=True)
class Execution:
    """How a kernel is computed: the execution options of every path (README, "Execution
    options"). Immutable and validated on construction; :meth:`replace` makes a changed copy.

    Attributes
    ----------
    dtype : "float64" (default) or "float32"
        Precision of the kernel computation (GP inference is always float64; the Monte Carlo
        networks default to float32).
    device : str, default "cpu"
        Torch device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked to exist).
    engine : "auto" (default), "fused", "torch" or "triton"
        What runs the layers: ``fused``, the numba CPU kernels (declining layers they do not
        handle to torch; CPU only); ``torch``, every layer's own torch code (the reference);
        ``triton``, the fused GPU kernels. ``auto``: ``fused`` on a CPU, ``torch`` elsewhere.
    batch_size : int, optional
        Image pairs per batch (default: chosen from ``memory_budget``).
    memory_budget : int or str, optional
        Working memory of one batch in bytes, or a size such as ``"2G"`` (default 2 GiB,
        ``CNNGP_MEMORY_BUDGET``; per worker for a store, which also sizes its tiles; 256 MiB
        per batch of networks for Monte Carlo).
    progress : bool, default False
        Progress bars on stderr (on by default for :func:`~cnngp.engine.distributed.store_kernel`
        and the sweep when no ``execution`` is given).
    checkpoint : path, optional
        In-memory kernels: save progress there every 30 s and on Ctrl-C; the same call resumes
        from it (a checkpoint of another computation is refused).
    keep_checkpoint : bool, default False
        Keep the checkpoint when done (the command line removes it once its output is in place).
    store : path, optional
        A Zarr kernel store ``K.zarr``: compute tile by tile into it, resumably (the sweep's and
        learn's ``--store``; :func:`~cnngp.engine.distributed.store_kernel` writes to ``out``).
    archive : path, optional
        With a store: a folder of compressed, portable copies of the finished tiles, restored
        from before computing.
    reuse : path, optional
        With a store: another store of the same computation (network, readouts, dtype; any
        tile size) on images that begin as these do (rows: x1, columns: x2; fewer images, the
        first of these, or more, these first): the finished part of the pairs both have is
        copied, not computed, so that growing a Gram matrix from N to N' images computes only
        the pairs with a new image (:func:`cnngp.engine.lending.lendable_tiles`). A tile
        archive (``archive.json``) lends the same way to a kernel on at least its images.
    workers : int, optional
        With a store: a local Dask cluster of this many worker processes (127.0.0.1 only).
    scheduler : str or distributed.Client, optional
        With a store: an existing Dask scheduler's address (``tcp://host:8786``) or client.
    tile : int, optional
        With a store: the tile side (default: from the memory budget and the workers).
    threads : int, optional
        With a store: torch and numba threads per task (default: cores / workers).

    Options that do not apply to a path are ignored when they come in an ``Execution`` and
    refused when given to that path as keywords.
    """

    dtype: str = "float64"
    device: str = "cpu"
    engine: str = "auto"
    batch_size: int | None = None
    memory_budget: int | None = None
    progress: bool = False
    checkpoint: str | os.PathLike | None = None
    keep_checkpoint: bool = False
    store: str | os.PathLike | None = None
    archive: str | os.PathLike | None = None
    reuse: str | os.PathLike | None = None
    workers: int | None = None
    scheduler: object = None
    tile: int | None = None
    threads: int | None = None

    def __post_init__(self):
        from cnngp.validation import parse_bytes, resolve_device, resolve_dtype

        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        put("dtype", str(resolve_dtype(self.dtype)).removeprefix("torch."))
        put("device", str(resolve_device(self.device)))
        resolve_engine(self.engine, self.device)
        put("batch_size", _positive_int("batch_size", self.batch_size))
        budget = self.memory_budget
        if isinstance(budget, str):
            budget = parse_bytes(budget, "memory_budget")
        put("memory_budget", _positive_int("memory_budget", budget, "a number of bytes >= 1 or a size such as '2G'"))
        for name in ("progress", "keep_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise CNNGPError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("checkpoint", "store", "archive", "reuse"):
            put(name, _path(name, getattr(self, name)))
        for name in ("workers", "tile", "threads"):
            put(name, _positive_int(name, getattr(self, name)))
        s = self.scheduler
        if s is not None and not (isinstance(s, str) and s.strip()) and not hasattr(s, "submit"):
            raise CNNGPError(f"scheduler: expected a Dask scheduler address such as 'tcp://host:8786' "
                             f"or a distributed.Client, got {s!r}")
        if self.workers is not None and self.scheduler is not None:
            raise CNNGPError("workers: cannot be combined with scheduler (that cluster has its own workers)")

    # -- building and changing ------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple:
        """Every option's name, in the documented order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def _check_names(cls, given, accepted, where: str) -> None:
        unknown = [k for k in given if k not in accepted]
        if unknown:
            known = [k for k in unknown if k in cls.names()]
            if known and len(known) == len(unknown):
                raise CNNGPError(f"{known[0]}: not an execution option of {where}; accepted here: "
                                 f"{', '.join(accepted)}")
            raise CNNGPError(f"{', '.join(map(str, unknown))}: unknown option{'s' if len(unknown) > 1 else ''}"
                             f" of {where}; accepted: {', '.join(accepted)}")

    def replace(self, **changes) -> "Execution":
        """A copy with ``changes`` (validated as on construction)."""
        self._check_names(changes, self.names(), "Execution")
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, execution=None, options=None, *, where: str = "Execution", accepted=None,
              defaults=None) -> "Execution":
        """``execution`` (an :class:`Execution` or None) with the keyword ``options`` applied:
        what every ``f(..., execution=None, **options)`` calls. ``accepted`` names the options
        this path takes as keywords (default: all); ``defaults`` are this path's own defaults,
        used only when no ``execution`` is given and the option is not either."""
        options = dict(options or {})
        cls._check_names(options, tuple(accepted or cls.names()), where)
        if execution is None:
            return cls(**{**(defaults or {}), **options})
        if not isinstance(execution, cls):
            raise CNNGPError(f"execution: expected a cnngp.Execution or None, got {type(execution).__name__}")
        return execution.replace(**options) if options else execution

    # -- reading ---------------------------------------------------------------------------

    @property
    def torch_dtype(self):
        """``dtype`` as a torch dtype."""
        import torch

        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def resolved_engine(self) -> str:
        """The engine that runs on ``device`` (``auto`` resolved)."""
        return resolve_engine(self.engine, self.device)

    @property
    def on_cluster(self) -> bool:
        """Whether a store's tasks run on Dask (``workers`` or ``scheduler``)."""
        return bool(self.workers) or self.scheduler is not None

    def gram_options(self) -> dict:
        """The keyword arguments of :class:`cnngp.engine.gram.GramPlan` (a task's recipe)."""
        return dict(dtype=self.dtype, device=self.device, engine=self.engine,
                    batch_size=self.batch_size, memory_budget=self.memory_budget)

    def as_dict(self) -> dict:
        """JSON-ready, for provenance: paths as strings, a client as its address, and the
        engine ``auto`` resolves to (``resolved_engine``)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, os.PathLike):
                v = os.fspath(v)
            if f.name == "scheduler" and v is not None and not isinstance(v, str):
                v = str(getattr(getattr(v, "scheduler", None), "address", None) or type(v).__name__)
            out[f.name] = v
        out["resolved_engine"] = self.resolved_engine
        return out
