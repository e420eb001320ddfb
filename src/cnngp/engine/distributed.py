"""Gram matrices into a kernel store, in this process or on a Dask cluster, resumably.

:func:`store_kernel` plans the tiles of a (L, N1, N2) matrix, creates (or reopens and checks)
the Zarr store (:mod:`cnngp.engine.store`), and runs two stages of small tasks whose only
arguments are the store's path and a unit of work:

1. ``self`` tasks, one per block of T images: each image's own variances (the self pass), once
   per image, written to the store;
2. ``tile`` tasks, one per tile: the block of the matrix from the rows' and columns' images and
   records (:meth:`cnngp.engine.gram.GramPlan.block`), written to the tile's own chunks, then
   its record with the checksum of the bytes.

Without a cluster the tasks run here one after another (the default, single-machine engine).
With ``workers=N`` a Dask ``LocalCluster`` of N worker processes listening on 127.0.0.1 only;
with ``scheduler=ADDRESS`` an existing cluster (e.g. started by ``dask-jobqueue`` on SLURM or
PBS). Dask reruns the tasks of a lost worker; a task that runs twice writes the same bytes. A
rerun of the same call verifies every finished tile against its checksum and computes only the
missing and bad ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import torch

from cnngp.engine.execution import COMPUTE, STORE, Execution
from cnngp.engine import fused
from cnngp.engine.gram import DEFAULT_MEMORY_BUDGET, GramPlan, SelfRecords, mirrored_offsets
from cnngp.engine.resources import human_bytes
from cnngp.engine.storage import fingerprint
from cnngp.engine.store import (
    STORE_FORMAT, KernelStore, StoreWriteError, Tile, difference_words, tile_plan, writer_lock,
)
from cnngp.errors import CNNGPError
from cnngp.provenance import versions

__all__ = ["store_kernel", "store_dry_run", "StoreReport", "choose_tile", "dask_client", "TILE_SIZES"]

#: tile sides :func:`choose_tile` picks from (largest first)
TILE_SIZES = (1024, 512, 256, 128, 64, 32, 16)
#: resident memory of one local Dask worker process with torch and cnngp imported (measured
#: here: about 260 MB each), on top of the worker's --memory-budget
WORKER_PROCESS_BYTES = 260 * 1024**2
#: the most tiles a store's plan may hold (a smaller --tile plans more, and takes longer to list)
MAX_TILES = 1_000_000
#: seconds to connect to ``--scheduler`` (a listener that accepts and never answers included)
SCHEDULER_TIMEOUT_S = 20.0


def count_tiles(n1: int, n2: int | None, tile: int) -> int:
    """len(tile_plan(n1, n2, tile)), without building the list."""
    rows = -(-int(n1) // int(tile))
    if n2 is None:
        return rows * (rows + 1) // 2
    return rows * -(-int(n2) // int(tile))


def check_local_cluster(workers: int, threads: int | None, budget: int) -> None:
    """Refuse, before any process starts, a local cluster this machine cannot hold: every worker
    process costs :data:`WORKER_PROCESS_BYTES` plus its memory budget, and a worker's threads
    are at most this machine's cores."""
    from cnngp.engine.resources import check_job

    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        raise CNNGPError(f"--threads-per-worker {threads}: this machine has {cores} cores; "
                         f"use at most {cores}")
    if not workers:
        return
    check_job(
        f"--workers {workers} ({human_bytes(WORKER_PROCESS_BYTES)} per worker process plus its "
        f"--memory-budget {human_bytes(budget)})",
        memory_bytes=workers * (WORKER_PROCESS_BYTES + budget),
        remedy="use fewer --workers or a smaller --memory-budget",
    )


@dataclass
class StoreReport:
    """What a :func:`store_kernel` call found and did."""

    path: str
    shape: tuple
    tile: int
    tiles_total: int
    tiles_done_before: int
    tiles_bad: int
    tiles_computed: int
    self_blocks_computed: int
    pairs_computed: int
    seconds: float
    workers: int
    dashboard: str | None = None
    dry_run: dict | None = field(default=None)
    tiles_restored: int = 0
    archive: str | None = None
    tiles_reused: int = 0  # copied from the store ``reuse``
    tiles_lend_refused: int = 0  # that ``reuse`` would lend, whose copy failed its checks: computed
    reuse: str | None = None
    pairs_spot_checked: int = 0  # of the tiles the workers computed, recomputed here (spot_check)

    def as_dict(self) -> dict:
        return dict(self.__dict__, shape=list(self.shape))


# -- sizes ---------------------------------------------------------------------------------


def _record_bytes_per_image(plan: GramPlan, grids: dict) -> int:
    return sum(math.prod(g) for g in grids.values()) * plan.dtype.itemsize


def tile_bytes(plan: GramPlan, tile: int, grids: dict) -> int:
    """Memory one tile task holds besides the engine's batch working set: the block (and its
    mirror copy), two blocks of images and of self records."""
    item = plan.dtype.itemsize
    block = plan.n_outputs * tile * tile * item * 3
    images = 2 * tile * math.prod(plan.image_shape) * item
    return block + images + 2 * tile * _record_bytes_per_image(plan, grids)


def choose_tile(plan: GramPlan, n1: int, n2: int | None, grids: dict, budget: int, workers: int) -> int:
    """The tile side: the largest of :data:`TILE_SIZES` whose task fits in half the worker's
    memory budget and that leaves at least 4 tiles per worker to balance (when N allows)."""
    n = max(n1, n2 or n1)
    fitting = [t for t in TILE_SIZES if tile_bytes(plan, t, grids) <= budget // 2] or [TILE_SIZES[-1]]
    for t in fitting:
        if len(tile_plan(n1, n2, t)) >= 4 * max(1, workers) or t <= 16:
            return min(t, n)
    return min(fitting[-1], n)


# -- the tasks (run on workers; arguments are small and picklable) -------------------------

_PLANS: dict = {}


def _set_threads(threads: int | None) -> None:
    if not threads:
        return
    fused.use_threads(threads)  # for this task's thread, whatever torch reads back there
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _plan(key: str, recipe) -> GramPlan:
    plan = _PLANS.get(key)
    if plan is None:
        if isinstance(recipe, bytes):
            recipe = pickle.loads(recipe)
        model, image_shape, options = recipe
        plan = GramPlan(model, image_shape, **options)
        _PLANS.clear()  # one computation at a time per process
        _PLANS[key] = plan
    return plan


def _records(store: KernelStore, plan: GramPlan, which: str, sl: slice) -> SelfRecords:
    arrays = store.read_self(which, sl)
    return SelfRecords({int(k): torch.as_tensor(v, device=plan.device) for k, v in arrays.items()},
                       sl.stop - sl.start)


def run_self_task(path: str, key: str, recipe: tuple, which: str, block: int, sl: slice,
                  threads: int | None) -> tuple:
    """Stage 1 on a block of images: their self records, into the store."""
    _set_threads(threads)
    store = KernelStore.open(path)
    plan = _plan(key, recipe)
    x = torch.as_tensor(store.images(which, sl), device=plan.device)
    records = plan.self_records(x)
    store.write_self(which, block, sl, {k: v.cpu().numpy() for k, v in records.variances.items()})
    return which, block


def run_tile_task(path: str, key: str, recipe: tuple, tile: Tile, threads: int | None,
                  progress=None) -> tuple:
    """Stage 2 on one tile: its block of the matrix, into the store, then its record.
    ``progress.update(pairs)`` is called after every batch of pairs (in-process runs)."""
    _set_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    store = KernelStore.open(path)
    plan = _plan(key, recipe)
    x_rows = torch.as_tensor(store.images("x1", tile.rows), device=plan.device)
    rec_rows = _records(store, plan, "x1", tile.rows)
    if tile.diagonal:
        block = plan.block(x_rows, rec_rows, progress=progress)
    else:
        which = "x1" if store.symmetric else "x2"
        x_cols = torch.as_tensor(store.images(which, tile.cols), device=plan.device)
        block = plan.block(x_rows, rec_rows, x_cols, _records(store, plan, which, tile.cols), progress=progress)
    seconds = time.perf_counter() - start
    store.write_tile(tile, block.numpy(), seconds, time.process_time() - cpu_start, worker=_on_worker())
    return tile.name, tile.pairs, seconds


def _on_worker() -> bool:
    """Whether this process is a Dask worker (its tiles are then spot-checked: spot_check)."""
    if "distributed" not in sys.modules:
        return False
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def run_lend_task(path: str, source: str, origin: str, tile: Tile) -> bool:
    """Stage 2 on one tile lent by the store or tile archive at ``source`` (``--reuse``, named
    ``origin`` in the record): copied into the store at ``path`` by
    :func:`cnngp.engine.lending.lend_tile`. False when its bytes no longer match the lender's
    record (nothing written: compute it)."""
    from cnngp.engine.lending import lend_tile, open_source

    store = KernelStore.open(path)
    try:
        lender = open_source(source)
    except (CNNGPError, OSError):  # gone since the run began, or not on this worker's file system
        return False
    return lend_tile(store, lender, tile, origin)


# -- clusters -------------------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None,
                memory_limit: int | None = None):
    """A Dask client: an existing cluster at ``scheduler``, or a ``LocalCluster`` of
    ``workers`` single-task worker processes bound to 127.0.0.1 (closed on exit, even on error)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - a declared dependency
        raise CNNGPError("--workers/--scheduler need dask.distributed (pip install 'dask[distributed]')") from None
    if scheduler is not None:
        client = _connect(Client, scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a worker process being started runs the parent's script again when the script has no
        # main guard: here it would start a cluster of its own (Dask then fails as "Nanny
        # failed to start", or a wrapper that catches that goes on as a worker)
        raise CNNGPError("--workers: a local cluster cannot be started while this process is itself being "
                         "started by multiprocessing: a script that runs cnngp with workers must do so under "
                         "`if __name__ == \"__main__\":`")
    import dask

    scratch = _scratch_folder()
    # Dask's own lock files (dask-scratch-space/global.lock, purge.lock) go into it too, not
    # into the shared temp folder, where they outlived the run
    try:
        with dask.config.set({"temporary-directory": scratch}):
            cluster = LocalCluster(  # every listening socket, the dashboard's included, on 127.0.0.1
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", memory_limit=memory_limit or "auto",
                silence_logs=logging.ERROR, local_directory=scratch,
                preload=["cnngp.engine._dask_worker"],  # workers ignore Ctrl-C: this process handles it
            )
            try:
                client = Client(cluster)
                try:
                    yield client
                finally:
                    client.close()
            finally:
                cluster.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


#: the prefix of the workers' scratch folders in the temp folder: ``cnngp-dask-PID-…``
SCRATCH_PREFIX = "cnngp-dask-"


def _scratch_folder() -> str:
    """A fresh temp folder for the local workers' scratch space (removed when the cluster
    closes), after removing those left by runs that were killed (their process is gone)."""
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(SCRATCH_PREFIX)]
    except OSError:
        names = []
    for name in names:
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        try:
            mine = os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _check_address(scheduler: str) -> None:
    """Refuse an address Dask cannot parse ('junk', a missing port) with one line."""
    try:
        from distributed.comm import parse_address
        from distributed.comm.addressing import parse_host_port
    except ImportError:  # pragma: no cover - a declared dependency
        return
    try:
        protocol, location = parse_address(scheduler)
        if protocol in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except (ValueError, TypeError) as e:
        raise CNNGPError(f"--scheduler: not a scheduler address {scheduler!r} ({e}); "
                         "expected e.g. tcp://HOST:8786") from None


def _connect(Client, scheduler: str):
    """``Client(scheduler)`` within :data:`SCHEDULER_TIMEOUT_S`: Dask's own timeout covers the
    TCP connection but not the handshake, which waits forever on a listener that never answers;
    the connection runs in a thread that is given up on (a daemon) past the deadline."""
    timeout = float(SCHEDULER_TIMEOUT_S)
    result: dict = {}

    def connect():
        try:
            result["client"] = Client(scheduler, timeout=f"{timeout}s")
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=connect, name="cnngp-scheduler-connect", daemon=True)
    thread.start()
    thread.join(timeout + 5.0)
    if thread.is_alive():
        raise CNNGPError(f"--scheduler: {scheduler!r} did not answer within {timeout:g} s "
                         "(is a Dask scheduler listening there?)")
    error = result.get("error")
    if isinstance(error, ValueError):  # 'junk': no protocol or port
        raise CNNGPError(f"--scheduler: not a scheduler address {scheduler!r} ({error}); "
                         "expected e.g. tcp://HOST:8786") from None
    if isinstance(error, (OSError, TimeoutError)):
        raise CNNGPError(f"--scheduler: cannot reach {scheduler!r} ({error})") from None
    if error is not None:
        raise error
    return result["client"]


# -- the driver ------------------------------------------------------------------------------


def _progress_bar(total_pairs: int, tiles_total: int, tiles_done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total_pairs, unit="pair", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               desc="tiles", smoothing=0.05)
    bar.set_postfix_str(f"{tiles_done}/{tiles_total} tiles")
    return bar


def _tiles_to_compute(out, identity: dict, tiles: list, what: str, reuse=None, images=(), archive=None) -> tuple:
    """``(to compute, lent, restored)``: the tiles a run would compute (all of them, or what a
    store of this computation lacks, less those its tile ``archive`` would restore and those
    the store ``reuse`` would lend; ``images``: the run's x1 and x2), those it would copy from
    ``reuse`` and those from ``archive``; a store of another computation is refused here, as the
    run would refuse it."""
    from cnngp.engine.archive import restorable_tiles
    from cnngp.engine.lending import lendable_tiles
    from cnngp.engine.store import refuse_other_computation

    if KernelStore.stored_tile(out) is not None:
        try:
            store = KernelStore.open(out)
        except CNNGPError:
            store = None
        if store is not None:
            full = {"format": STORE_FORMAT, **identity}
            if not store.images_within_rounding(full, dict(zip(("x1", "x2"), images))):  # (the run rekeys those)
                refuse_other_computation(out, store.attrs, full, what)
            state = store.verify()
            left = {t.name for t in state["missing"] + state["bad"]}
            tiles = [t for t in tiles if t.name in left]
    restored = []
    if archive is not None and (Path(archive) / "archive.json").is_file():
        restored = restorable_tiles(archive, tiles)
        names = {t.name for t in restored}
        tiles = [t for t in tiles if t.name not in names]
    lent = []
    if reuse is not None:
        _, lent = lendable_tiles(reuse, identity, *images, tiles)
        lent_names = {t.name for t in lent}
        tiles = [t for t in tiles if t.name not in lent_names]
    return tiles, lent, restored


#: bytes of a file system block: each chunk and record file takes whole ones
FILE_BLOCK = 4096


def _dry_run(plan, xa, xb, tiles, grids, tile, workers, threads, budget, path, on_cluster=False,
             cold_workers=True, lent=(), restored=()) -> dict:
    """Plan, sizes and a time estimate (:mod:`cnngp.engine.timing`): a few pairs of this plan
    timed here at the workers' thread count, the tiles scheduled on the workers, the start of a
    local cluster and its workers included. ``lent``: tiles copied from another store, and
    ``restored``: from the tile archive, written but not computed."""
    from cnngp.engine import timing

    n_pairs = sum(t.pairs for t in tiles)
    n_images = xa.shape[0] + (0 if xb is None else xb.shape[0])
    item = plan.dtype.itemsize
    L, n1 = plan.n_outputs, xa.shape[0]
    n2 = n1 if xb is None else xb.shape[0]
    store_bytes = (L * n1 * n2 + n_images * (math.prod(plan.image_shape)
                                              + _record_bytes_per_image(plan, grids) // item)) * item
    # what is still to be written: a resumed store has its images and self records and needs
    # only the chunks and records of the tiles still to compute (mirrors included). Every
    # chunk is a file in folders of its own (Zarr's c/i/j/k keys) and takes whole blocks of
    # the file system: with small tiles the blocks, not the numbers, fill a disk
    def on_disk(nbytes: int) -> int:
        return -(-nbytes // FILE_BLOCK) * FILE_BLOCK + FILE_BLOCK

    disk_bytes = sum(on_disk(L * item * (t.rows.stop - t.rows.start) * (t.cols.stop - t.cols.start))
                     * (2 if t.mirror else 1) + FILE_BLOCK for t in [*tiles, *lent, *restored])
    if not (Path(path) / "zarr.json").is_file():
        per_image = math.prod(plan.image_shape) * item + _record_bytes_per_image(plan, grids)
        chunks = math.ceil(n1 / tile) + (0 if xb is None else math.ceil(n2 / tile))
        disk_bytes += n_images * per_image + chunks * (1 + len(grids)) * 2 * FILE_BLOCK
    rates = timing.measure(plan, plan.images(xa[:timing.MAX_SIDE]), threads=threads)
    w = max(1, workers)
    # a local cluster runs at most as many tasks at once as this machine's cores hold threads
    # of theirs (8 single-thread workers on 2 cores are 2 at a time, each at its timed rate)
    at_once = w
    if on_cluster and cold_workers:
        at_once = max(1, min(w, (os.cpu_count() or 1) // max(1, threads or 1)))
    # the tiles still to do are priced (a resumed store), the self pass of every image
    est = timing.estimate(rates, [timing.Stage("kernel", n1, None if xb is None else n2, flip=plan.flip)],
                          workers=at_once if on_cluster else None, tile_pairs=[[t.pairs for t in tiles]],
                          images_per_task=tile, cold_workers=cold_workers)
    serial = n_pairs * rates.seconds_per_pair + n_images * rates.seconds_per_image
    return {
        "tiles": len(tiles),
        "tiles_lent": len(lent),
        "diagonal_tiles": sum(t.diagonal for t in tiles),
        "tile": tile,
        "pairs": n_pairs,
        "flip": plan.flip,  # each pair twice: K(x, x') and K(x, flip x'), in seconds_per_pair
        "images": n_images,
        "store_bytes": int(store_bytes),
        "disk_bytes": int(disk_bytes),
        "memory_per_worker_bytes": int(budget + tile_bytes(plan, tile, grids)),
        "workers": w,
        "workers_at_once": at_once,  # a local cluster: as many as this machine's cores hold
        "threads_per_worker": threads,
        "timed_pairs": rates.pairs_timed,
        "seconds_per_pair": rates.seconds_per_pair,
        "seconds_per_image_self": rates.seconds_per_image,
        "warmup_seconds": rates.warmup_seconds,
        "start_seconds": rates.start_seconds,
        "load_average": rates.load_average,
        "estimated_seconds_one_worker": serial,
        "estimated_seconds": est.seconds,
        "fixed_seconds": est.fixed_seconds,  # of those, paid once per command (timing.total_seconds)
        "estimate": est.describe(),
        "path": str(path),
    }


def _tiles_elsewhere(d: dict) -> str:
    """" (of 10; 3 copied from K1.zarr, the rest in the store)": where the plan's other tiles come from."""
    total, lent, restored = d.get("tiles_total", d["tiles"]), d.get("tiles_lent", 0), d.get("tiles_restored", 0)
    rest = total - d["tiles"] - lent - restored
    checked = " after a check of its images by pairs: their sha256 differs" if d.get("archive_images_differ") else ""
    parts = ([f"{restored} restored from {d['archive']} (--archive){checked}"] if restored else []) \
        + ([f"{lent} copied from {d['reuse']} (--reuse)"] if lent else []) \
        + (["the rest in the store" if lent or restored else "the rest are in the store"] if rest else [])
    return f" (of {total}; {', '.join(parts)})" if parts else ""


def describe_dry_run(d: dict) -> str:
    """The dry run as the lines ``cnngp kernel --dry-run`` prints."""
    return "\n".join([
        f"plan: {d['tiles']} tiles of {d['tile']} to compute"
        + _tiles_elsewhere(d)
        + f", {d['diagonal_tiles']} on the diagonal; {d['pairs']:,} image pairs"
        + (" × 2 (flip-averaged: each also against the mirrored image)" if d.get("flip") is True
           else " (the mirror term: each against the mirrored image)" if d.get("flip") else "")
        + f", {d['images']:,} images in the self pass",
        f"store: {d['path']} about {human_bytes(d['store_bytes'])}",
        f"per worker: about {human_bytes(d['memory_per_worker_bytes'])} "
        f"({d['threads_per_worker'] or 'all'} threads); {d['workers']} worker(s)"
        + (f", {d['workers_at_once']} at a time on this machine's {os.cpu_count()} cores (priced so)"
           if d.get("workers_at_once", d["workers"]) < d["workers"] else ""),
        d["estimate"],
    ])


def store_kernel(model, x1, x2=None, *, out=None, readouts=None, labels=None, get="nngp",
                 offsets: bool = False, flip: bool = False, execution=None, **options) -> StoreReport:
    """Compute the Gram matrix of ``model`` (or of ``model`` under each of ``readouts``) on
    images ``x1`` × ``x2`` (``x2=None``: x1 × x1) into the kernel store at ``out``.

    Parameters
    ----------
    model, x1, x2, readouts
        As for :func:`cnngp.kernel` / :func:`cnngp.readout_sweep`.
    out : path-like, optional
        The store (``K.zarr``; default: the execution's ``store``). An existing store of the
        same computation is resumed: its finished tiles are verified against their checksums,
        and only missing or bad ones run.
    labels : list, optional
        Names of the readouts (recorded in the store).
    get : "nngp" (default), "ntk" or "both"
        The kernels stored, kernel type first along the leading axis: with ``"both"`` and L
        readouts, ``kernel[:L]`` is the NNGP and ``kernel[L:]`` the NTK.
    offsets : bool
        Store the offset sums S (M, N1, N2) of ``model``'s last hidden layer instead of
        kernels (:func:`cnngp.offset_sums`; ``model`` is then a body and ``readouts`` None).
    flip : bool or "mirror"
        Store the flip-averaged kernels ½[K(x1, x2) + K(x1, flip x2)] (:func:`cnngp.kernel`'s
        ``flip``; docs/maths.md §9): every tile computes both terms for its pairs. ``"mirror"``:
        the second term alone, to be averaged with a plain store of the same pairs (the
        sweep's stores, ``cnngp.experiments.sweep.mirror_store_path``). Part of the store's
        identity: a store of another setting is refused, never resumed.
    execution, **options
        How to compute (:class:`cnngp.Execution`, README "Execution options"): ``dtype``,
        ``device``, ``engine``, ``batch_size``, ``memory_budget`` (per worker; it also decides
        the tile size), ``progress`` (default on), and the store's ``archive``, ``workers``,
        ``scheduler`` (an address or a ``distributed.Client``), ``tile`` (part of the store's
        identity) and ``threads`` (per task; default this machine's cores / workers).

    :func:`store_dry_run` plans, sizes and times the same call without computing anything.
    """
    ex = Execution.build(execution, options, where="store_kernel", accepted=COMPUTE + STORE,
                         defaults={"progress": True})
    return _store(model, x1, x2, out, readouts, labels, (get, offsets, flip), False, ex)


def store_dry_run(model, x1, x2=None, *, out=None, readouts=None, get="nngp", offsets: bool = False,
                  flip: bool = False, execution=None, **options) -> StoreReport:
    """What :func:`store_kernel` with the same arguments would do, computing and writing
    nothing: the tile plan (of a store being resumed, only the tiles it lacks), sizes, and a
    time estimate from a few pairs timed here (:mod:`cnngp.engine.timing`), in the returned
    report's ``dry_run`` dict (``describe_dry_run`` prints it; ``cnngp kernel --dry-run``)."""
    ex = Execution.build(execution, options, where="store_dry_run", accepted=COMPUTE + STORE,
                         defaults={"progress": True})
    return _store(model, x1, x2, out, readouts, None, (get, offsets, flip), True, ex)


def _store(model, x1, x2, out, readouts, labels, kind, dry_run: bool, ex: Execution) -> StoreReport:
    """:func:`store_kernel` (or with ``dry_run`` :func:`store_dry_run`); ``kind`` is
    (get, offsets, flip): what is computed."""
    get, offsets, flip = kind
    what = "--out" if out is not None else "--store"
    out = ex.store if out is None else out
    if out is None:
        raise CNNGPError("out: store_kernel needs a store path (out=K.zarr or the execution's store)")
    memory_budget = ex.memory_budget
    tile, workers, progress, archive, threads_per_worker = ex.tile, ex.workers, ex.progress, ex.archive, ex.threads
    client = ex.scheduler if ex.scheduler is not None and not isinstance(ex.scheduler, str) else None
    scheduler = ex.scheduler if isinstance(ex.scheduler, str) else None
    if scheduler is not None:
        _check_address(scheduler)  # before the store is created: a typo leaves nothing behind
    if offsets and flip is True:  # a tile's transpose needs its two terms apart (GramPlan.mirrored)
        raise CNNGPError("flip: flip-averaged offset sums are not stored as one; store the plain sums "
                         "and, in a second store, their mirror term (flip='mirror'), and average the two "
                         "(as cnngp learn --flip --store does)")
    x1 = np.asarray(x1) if not isinstance(x1, torch.Tensor) else x1
    plan = GramPlan(model, tuple(x1.shape[1:]), readouts=readouts, get=get, offsets=offsets, flip=flip,
                    execution=ex)
    xa = plan.images(x1, "x1").cpu().numpy()
    xb = None if x2 is None else plan.images(x2, "x2").cpu().numpy()
    n1 = xa.shape[0]
    n2 = None if xb is None else xb.shape[0]
    probe = plan.self_records(torch.as_tensor(xa[:1], device=plan.device))
    grids = {int(k): tuple(v.shape[1:]) for k, v in probe.variances.items()}
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    n_workers = 1 if (client is None and scheduler is None and not workers) else (workers or 1)
    if client is not None:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    if threads_per_worker is None:
        threads_per_worker = max(1, (os.cpu_count() or 1) // n_workers) if (workers or client or scheduler) else None
    if client is None and scheduler is None:  # this machine's processes: before any starts
        check_local_cluster(workers or 0, ex.threads, budget)
    if tile is None:  # a store being resumed keeps its tile, whatever the workers now
        from cnngp.engine.archive import archive_tile
        from cnngp.engine.lending import source_tile

        # (a store restored from an archive takes its tile, as it must; a store grown from
        # another takes the lender's: each of its tiles is then lent whole)
        tile = (KernelStore.stored_tile(out) or (archive is not None and archive_tile(archive))
                or (ex.reuse is not None and source_tile(ex.reuse))
                or choose_tile(plan, n1, n2, grids, budget, n_workers))
    n_tiles = count_tiles(n1, n2, tile)
    if n_tiles > MAX_TILES:
        n = max(n1, n2 or n1)
        least = next(t for t in range(int(tile), n + 1) if count_tiles(n1, n2, t) <= MAX_TILES)
        raise CNNGPError(f"--tile {tile}: plans {n_tiles:,} tiles for {n1}" + ("" if n2 is None else f"×{n2}")
                         + f" images, over the {MAX_TILES:,} accepted; use --tile {least} or more")
    tiles = tile_plan(n1, n2, tile)
    # what a task needs to rebuild the plan: plain values (the engine included), no client
    recipe = (plan.body, plan.image_shape, dict(readouts=readouts, get=plan.kernels, offsets=bool(offsets),
                                                flip=plan.flip, **ex.gram_options()))
    if readouts is None:
        recipe = (model, plan.image_shape, {k: v for k, v in recipe[2].items() if k != "readouts"})
    identity = {
        "spec": plan.body.to_spec(),
        "readouts": [h.to_spec() for h in plan.heads],
        "x1_sha256": fingerprint(xa),
        "x2_sha256": None if xb is None else fingerprint(xb),
        "dtype": str(plan.dtype).removeprefix("torch."),
        "tile": int(tile),
        "shape": [plan.n_outputs, n1, n1 if n2 is None else n2],
    }
    if plan.kernels != ("nngp",):  # stores of NNGPs alone keep the identity they always had
        identity["kernels"] = list(plan.kernels)
    if offsets:
        identity["offsets"] = True
    if plan.flip:  # flip-averaged kernels or their mirror term (docs/maths.md §9): never resumed
        identity["flip"] = plan.flip  # as plain ones, nor as each other
    # the tasks' key: the computation and how it runs (a worker's cached plan is one engine's)
    key = fingerprint(identity, recipe[2]["engine"], recipe[2]["batch_size"], recipe[2]["memory_budget"],
                      str(plan.device))
    differ = ()
    if archive is not None:  # before the store is made (a dry run too): a refusal leaves nothing behind
        from cnngp.engine.archive import check_archive_apart, check_archive_identity

        from cnngp.engine.archive import archive_images_differ

        check_archive_apart(archive, out, "--archive")
        differ = archive_images_differ(archive, {"format": STORE_FORMAT, **identity})
        if differ and not dry_run:  # the same images to rounding? (a dry run prices them as restored)
            verify_archive_images(plan, archive, {"format": STORE_FORMAT, **identity}, xa, xb, tiles, differ,
                                  "--archive", progress)
        elif not differ:
            check_archive_identity(archive, {"format": STORE_FORMAT, **identity}, "--archive")
    if dry_run:
        to_compute, lent, restored = _tiles_to_compute(out, identity, tiles, what, ex.reuse, (xa, xb), archive)
        d = _dry_run(plan, xa, xb, to_compute, grids, tile, n_workers,
                     threads_per_worker, budget, out, on_cluster=bool(workers or client or scheduler),
                     cold_workers=client is None and scheduler is None, lent=lent, restored=restored)
        d["tiles_total"] = len(tiles)
        d["tiles_restored"], d["archive"] = len(restored), None if archive is None else str(archive)
        d["reuse"] = None if ex.reuse is None else str(ex.reuse)
        d["archive_images_differ"] = list(differ)  # the run checks them by pairs first (verify_archive_images)
        return StoreReport(str(out), tuple(identity["shape"]), tile, len(tiles), 0, 0, 0, 0, 0, 0.0,
                           n_workers, dry_run=d)
    provenance = {"versions": versions(), "labels": list(labels or []),
                  **({"offset_shape": list(plan.offset_shape)} if offsets else {}),
                  "self_grids": {str(k): list(v) for k, v in grids.items()},
                  "execution": {k: v for k, v in ex.as_dict().items() if k not in ("checkpoint", "keep_checkpoint")}}
    if ex.reuse is not None:  # before the store is made: a refused lender leaves no store behind
        from cnngp.engine.lending import open_lender, refuse_lending_to_itself

        refuse_lending_to_itself(ex.reuse, out)
        open_lender(ex.reuse, identity, xa, xb)
    with contextlib.ExitStack() as session:
        if scheduler is not None:  # connect first: a cluster that cannot be reached leaves no store
            client = session.enter_context(dask_client(None, scheduler))
            scheduler = None
        session.enter_context(writer_lock(out, what))  # one run fills a store at a time
        store = KernelStore.create(out, identity, xa, xb, grids, provenance, what=what)

        start = time.perf_counter()
        state = store.verify()
        for t in state["bad"]:
            store.forget(t)
        pending = {t.name for t in state["missing"] + state["bad"]}
        todo = [t for t in tiles if t.name in pending]  # the plan's nested order: leading blocks first
        saver = None
        restored = lent = lend = []
        refused: list = []  # lent tiles whose copy failed its checks here
        if archive is not None:
            from cnngp.engine.archive import TileArchive

            saver = TileArchive(archive, store)
            restored = saver.restore(todo)
        on_cluster = client is not None or bool(workers)
        if ex.reuse is not None and todo:  # another store lends what it holds of the rest
            from cnngp.engine.lending import lendable_tiles, reuse_tiles

            restored_names = {t.name for t in restored}
            rest = [t for t in todo if t.name not in restored_names]
            if on_cluster:  # the workers copy them, tile by tile, beside the tiles they compute
                lend = lendable_tiles(ex.reuse, identity, xa, xb, rest)[1]
            else:
                lent = reuse_tiles(store, ex.reuse, rest, refused=refused)
        filled = {t.name for t in restored + lent + lend}  # names: plans reach a million tiles
        todo = [t for t in todo if t.name not in filled]
        state["done"] += restored + lent
        if saver is not None:
            restored_names = {t.name for t in restored}
            for t in state["done"]:  # tiles the archive lacks, or holds damaged, from the store
                if t.name not in restored_names and not saver.intact(t):
                    saver.save(t)
        blocks = [(w, b, sl) for w, b, sl in store.image_blocks() if not store.self_done(w, b, sl)]
        report = StoreReport(str(out), tuple(identity["shape"]), tile, len(tiles), len(state["done"]),
                             len(state["bad"]), 0, 0, 0, 0.0, n_workers, tiles_restored=len(restored),
                             archive=None if archive is None else str(archive), tiles_reused=len(lent),
                             reuse=None if ex.reuse is None else str(ex.reuse), tiles_lend_refused=len(refused))
        if progress and (state["done"] or state["bad"] or lend or refused):
            print(f"{out}: {len(state['done'])} of {len(tiles)} tiles already done"
                  + (f" ({len(restored)} restored from {archive})" if restored else "")
                  + (f" ({len(lent)} reused from {ex.reuse})" if lent else "")
                  + (f", {len(lend)} to copy from {ex.reuse} on the workers" if lend else "")
                  + f", {len(todo)} to compute"
                  + (f" ({len(state['bad'])} bad, recomputed)" if state["bad"] else "")
                  + (f" ({len(refused)} that {ex.reuse} would lend did not match their records there or "
                     "could not be read: computed)" if refused else ""), file=sys.stderr)
        if not todo and not lend:  # self records are needed only by tiles still to compute
            # (a store an interrupted cluster run finished: its workers' tiles not yet checked)
            report.pairs_spot_checked = spot_check(plan, store, xa, xb, saver, what)
            report.seconds = time.perf_counter() - start
            return report
        book = _TileBook(report, saver, todo + lend, len(tiles))
        try:
            if not on_cluster:
                _PLANS.clear()
                _PLANS[key] = plan
                for w, b, sl in blocks:
                    run_self_task(str(out), key, recipe, w, b, sl, threads_per_worker)
                    report.self_blocks_computed += 1
                book.start_progress(todo, progress)
                for t in todo:
                    batches = _BatchProgress(book.bar)
                    name, pairs, _ = run_tile_task(str(out), key, recipe, t, threads_per_worker,
                                                   progress=batches if book.bar is not None else None)
                    book.computed(name, pairs, batches.shown)
            else:
                memory_limit = None if memory_budget is None else int(memory_budget) + 2 * 1024**3
                ctx = contextlib.nullcontext(client) if client is not None else dask_client(
                    workers, scheduler, memory_limit)
                with ctx as c:
                    report.dashboard = _dashboard(c)
                    if progress:
                        print(f"dask: {len(c.scheduler_info().get('workers', {}))} worker(s) at "
                              f"{c.scheduler.address}" + (f", dashboard {report.dashboard}" if report.dashboard else ""),
                              file=sys.stderr)
                    book.start_progress(todo, progress)
                    # workers of a cluster may run in another folder: they get the stores' absolute
                    # paths (os.path.abspath: symlinks are not followed)
                    lending = None if not lend else (os.path.abspath(ex.reuse), str(ex.reuse), lend)
                    try:
                        _run_on_dask(c, os.path.abspath(out), key, recipe, blocks, todo, threads_per_worker,
                                     store.symmetric, book, lending)
                    except BaseException as e:
                        # the tiles the workers finished before it stopped are checked now (a
                        # refusal says so instead), else on the next run
                        spot_check(plan, store, xa, xb, saver, what)
                        if not isinstance(e, Exception) or not _workers_lost(e):
                            raise
                        raise CNNGPError(
                            f"dask: all workers were lost ({type(e).__name__}); the finished tiles are "
                            f"in {str(out)}: rerun to resume") from None
            report.pairs_spot_checked = spot_check(plan, store, xa, xb, saver, what)
        except StoreWriteError as e:  # a task knows the store's path; this call knows its flag
            raise e.named(what) from None
        finally:
            book.close()
        if progress and lend and report.tiles_lend_refused:
            print(f"{out}: {report.tiles_lend_refused} tile(s) that {ex.reuse} would lend did not match their "
                  "records there or could not be read on the workers: computed", file=sys.stderr)
        report.seconds = time.perf_counter() - start
        return report


#: the agreement asked of a pair a cluster's worker computed when this process computes it
#: again (:func:`spot_check`), relative to the pair's largest entry of each kernel type
SPOT_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


def spot_check(plan, store: KernelStore, xa, xb, saver=None, what: str = "--out") -> int:
    """Compute again, in this process, one pair of the tiles of every cluster worker whose
    tiles this process has not checked yet (those of this run, and of an earlier one that
    stopped before its check: :meth:`KernelStore.unchecked_worker_tiles`), each image's self
    records included, and the pair's mirror entry where the worker wrote one. A worker's record
    only hashes the bytes that worker wrote, so without this a worker that ran another cnngp,
    torch or numba than this process, or was sent another network or other images, would fill
    the store with wrong numbers that verify as done.

    A worker that agrees to rounding (:data:`SPOT_CHECK_TOLERANCE` of the pair's largest entry
    of each kernel type) is vouched for: its tiles' records say so (:meth:`KernelStore.vouch`).
    One that does not has every tile it computed discarded from the store and from ``saver``
    (its tile archive), and the store's self records with them (a worker writes those too), so
    that nothing wrong reads or resumes as done; then the run is refused, naming the worker,
    the pair and the difference. Returns the pairs checked."""
    groups = store.unchecked_worker_tiles()
    if not groups:
        return 0
    rng = np.random.default_rng(sum(len(tiles) for tiles in groups.values()))  # the same picks for the same store
    failed = []
    for worker, tiles in sorted(groups.items(), key=str):
        t = tiles[int(rng.integers(len(tiles)))]
        if t.diagonal and t.rows.stop - t.rows.start > 1:  # a pair above the diagonal: its mirror is below
            i = int(rng.integers(t.rows.start, t.rows.stop - 1))
            j = int(rng.integers(i + 1, t.cols.stop))
        else:
            i, j = int(rng.integers(t.rows.start, t.rows.stop)), int(rng.integers(t.cols.start, t.cols.stop))
        difference = _pair_difference(plan, store, xa, xb, i, j, mirror=t.mirror or (t.diagonal and i != j))
        if difference <= SPOT_CHECK_TOLERANCE.get(plan.dtype, 1e-4):
            store.vouch(tiles)
            if saver is not None:
                saver.vouch(tiles)
        else:
            failed.append((worker, t, i, j, difference, tiles))
    if failed:
        for *_, tiles in failed:
            for tile in tiles:
                store.forget(tile)
                if saver is not None:
                    saver.discard(tile)
        store.forget_self_records()
        (host, pid), t, i, j, difference, _ = failed[0]
        lost = sum(len(f[-1]) for f in failed)
        raise CNNGPError(
            f"{what}: the value of the pair ({i}, {j}) (tile {t.name}) computed by the worker {host}:{pid} differs "
            f"from this process's by {difference:.2g} relative"
            + (f" (and {len(failed) - 1} other worker(s) too)" if len(failed) > 1 else "")
            + f": the workers may run another cnngp, torch or numba than this process, or were sent something "
            f"else; the {lost} tile(s) they computed were discarded from {str(store.path)!r}"
            + ("" if saver is None else " and its archive") + " (check the workers' environment, then rerun)")
    return len(groups)


def _pair_values(plan, xa, xb, i: int, j: int) -> np.ndarray:
    """Every stored value of the pair (x1[i], x2[j]) (readouts, kernel types), computed here
    in float64 from the plan's own outputs."""
    a = torch.as_tensor(xa[i:i + 1], device=plan.device)
    b = torch.as_tensor((xa if xb is None else xb)[j:j + 1], device=plan.device)
    return plan.block(a, plan.self_records(a), b, plan.self_records(b)).double().cpu().numpy()[:, 0, 0]


def _relative_gap(got: np.ndarray, expected: np.ndarray, kinds: int) -> float:
    """The largest gap between a pair's values ``got`` and ``expected``, relative to the
    largest entry of each of its ``kinds`` kernel types (NNGP, NTK: their scales differ)."""
    gap = 0.0
    for g, e in zip(np.split(np.asarray(got, dtype=np.float64), kinds), np.split(expected, kinds)):
        scale = max(float(np.abs(e).max()), np.finfo(np.float64).tiny)
        gap = max(gap, float(np.abs(g - e).max()) / scale)
    return gap


def _pair_difference(plan, store: KernelStore, xa, xb, i: int, j: int, mirror: bool) -> float:
    """The largest gap between the store's entries of the pair (i, j) (and with ``mirror`` its
    entry (j, i), the pair the other way round) and the pair computed here (:func:`_relative_gap`)."""
    want = _pair_values(plan, xa, xb, i, j)
    pairs = [(np.asarray(store.kernel[:, i, j], dtype=np.float64), want)]
    if mirror:  # the worker also wrote the pair the other way round (offset sums reversed)
        turned = (mirrored_offsets(want, store.attrs.get("offset_shape") or [len(want)], store.attrs.get("flip"))
                  if store.attrs.get("offsets") else want)
        pairs.append((np.asarray(store.kernel[:, j, i], dtype=np.float64), turned))
    kinds = 1 if store.attrs.get("offsets") else max(1, len(plan.kernels))
    return max(_relative_gap(got, expected, kinds) for got, expected in pairs)


def covering_pairs(tiles: list, symmetric: bool) -> list[tuple[int, int, object]]:
    """Pairs ``(i, j, tile)`` inside ``tiles`` such that every image of their rows and columns
    is in at least one pair: a tile's k-th row with its k-th column (wrapping round the shorter
    side), kept only where it brings an image not yet covered. About one pair per image: a
    symmetric matrix's ``i`` and ``j`` are the same images (a diagonal tile gives (i, i))."""
    rows_seen: set = set()
    cols_seen = rows_seen if symmetric else set()
    pairs = []
    for t in tiles:
        h, w = t.rows.stop - t.rows.start, t.cols.stop - t.cols.start
        for k in range(max(h, w)):
            i, j = t.rows.start + k % h, t.cols.start + k % w
            if t.diagonal and i > j:  # a diagonal tile computes r <= c
                i, j = j, i
            if i not in rows_seen or j not in cols_seen:
                rows_seen.add(i)
                cols_seen.add(j)
                pairs.append((i, j, t))
    return pairs


def _values_at_pairs(plan, xa, xb, pairs: list, chunk: int = 2048) -> np.ndarray:
    """Every stored value of the listed pairs (x1[i], x2[j]) (``xb`` None: x1 × x1), computed
    here in float64: (n_outputs, P), through :meth:`GramPlan.at_pairs` in the plan's batches
    (one pair at a time costs ~25× as much), ``chunk`` pairs at a time with the self records of
    their images alone, so that memory does not grow with the matrix."""
    out = np.empty((plan.n_outputs, len(pairs)))
    for begin in range(0, len(pairs), chunk):
        part = np.asarray(pairs[begin:begin + chunk], dtype=np.int64).reshape(-1, 2)
        if xb is None:  # x1 × x1: each image's self records once, whichever side it is on
            images, at = np.unique(part, return_inverse=True)
            x_rows = x_cols = torch.as_tensor(np.ascontiguousarray(xa[images]), device=plan.device)
            rec_rows = rec_cols = plan.self_records(x_rows)
            row_at, col_at = at.reshape(-1, 2).T
        else:
            rows, row_at = np.unique(part[:, 0], return_inverse=True)
            cols, col_at = np.unique(part[:, 1], return_inverse=True)
            x_rows = torch.as_tensor(np.ascontiguousarray(xa[rows]), device=plan.device)
            x_cols = torch.as_tensor(np.ascontiguousarray(xb[cols]), device=plan.device)
            rec_rows, rec_cols = plan.self_records(x_rows), plan.self_records(x_cols)
        values = plan.at_pairs(x_rows, rec_rows, x_cols, rec_cols, torch.as_tensor(np.ravel(row_at)),
                               torch.as_tensor(np.ravel(col_at)))
        out[:, begin:begin + len(part)] = values.double().cpu().numpy()
    return out


def verify_archive_images(plan, archive, identity: dict, xa, xb, tiles: list, differ: tuple,
                          what: str = "--archive", progress: bool = True) -> dict:
    """Accept the archive at ``archive``, whose identity differs from ``identity`` only in the
    sha256 of its images (``differ``: :func:`cnngp.engine.archive.archive_images_differ`), as
    an archive of these images ``xa`` / ``xb``, or refuse it.

    The same images preprocessed on another machine (ZCA whitening: float64 eigenvectors and
    products whose last bits follow the BLAS) hash differently, so a run resumed there would
    otherwise recompute everything. Every image the archived tiles (of ``tiles``) hold is put
    in one pair at least (:func:`covering_pairs`), each pair is computed again here and
    compared with the archived values: all within :data:`SPOT_CHECK_TOLERANCE` of the dtype
    (rounding), and the header is rewritten with these images' sha256 and what was checked
    (``images_verified``); any pair beyond it, and the archive is refused as one of other
    images, nothing written. Returns the check's record."""
    from cnngp.engine.archive import read_archived_tile, rekey_archive_images, restorable_tiles

    archived = restorable_tiles(archive, tiles)
    pairs = covering_pairs(archived, xb is None)
    tolerance = SPOT_CHECK_TOLERANCE.get(plan.dtype, 1e-4)
    kinds = 1 if identity.get("offsets") else max(1, len(plan.kernels))
    n_out, dtype = int(identity["shape"][0]), np.dtype(identity["dtype"])
    if progress and pairs:
        print(f"{what}: {str(archive)!r} was computed on images whose sha256 differs from these (the same images "
              "preprocessed on another machine differ in their last bits); computing again "
              f"{len(pairs):,} pairs that cover every image it holds, to compare", file=sys.stderr)
    archived_values, kept, current = [], [], None
    for i, j, t in pairs:
        if t.name != current:  # pairs come tile by tile: one decoded at a time
            current, loaded = t.name, read_archived_tile(archive, t, n_out, dtype)
            block = None if loaded is None or isinstance(loaded, str) else loaded[0]
        if block is not None:  # a damaged tile is not restored but recomputed (said later)
            archived_values.append(block[:, i - t.rows.start, j - t.cols.start])
            kept.append((i, j, t))
    computed = _values_at_pairs(plan, xa, xb, [(i, j) for i, j, _ in kept])
    worst = 0.0
    for p, (i, j, t) in enumerate(kept):
        gap = _relative_gap(archived_values[p], computed[:, p], kinds)
        if not gap <= tolerance:
            which = " and ".join(difference_words(k, {}) for k in differ)
            raise CNNGPError(
                f"{what}: {str(archive)!r} holds tiles of a kernel of different {which}: their sha256 differs from "
                f"these images', and the pair ({i}, {j}) (tile {t.name}) computed on these differs from its archived "
                f"value by {gap:.2g} relative, beyond rounding ({tolerance:g}); give the archive of this computation "
                "or a new folder (nothing was written)")
        worst = max(worst, gap)
    check = {"pairs_checked": len(kept), "largest_relative_difference": worst, "tolerance": tolerance}
    rekey_archive_images(archive, identity, check)
    if progress and kept:
        print(f"{what}: the {len(kept):,} pairs agree with {str(archive)!r} to {worst:.1g} relative (rounding): "
              "its tiles are restored as this computation's", file=sys.stderr)
    return check


class _TileBook:
    """What a run's tiles come to, counted as each ends: the report, the tile archive (each
    tile saved there once written) and the progress bar (pairs to compute; tiles of the plan)."""

    def __init__(self, report: StoreReport, saver, tiles: list, n_tiles: int):
        self.report, self.saver, self.n_tiles = report, saver, n_tiles
        self.by_name = {t.name: t for t in tiles}
        self.done = report.tiles_done_before
        self.bar = None

    def start_progress(self, todo: list, progress: bool) -> None:
        self.bar = _progress_bar(sum(t.pairs for t in todo), self.n_tiles, self.done, progress)

    def _ended(self, name: str) -> None:
        self.done += 1
        if self.saver is not None:
            self.saver.save(self.by_name[name])
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.done}/{self.n_tiles} tiles")

    def computed(self, name: str, pairs: int, shown: int = 0) -> None:
        """A tile computed (``shown``: pairs the bar already counted batch by batch)."""
        self.report.tiles_computed += 1
        self.report.pairs_computed += pairs
        if self.bar is not None:
            self.bar.update(pairs - shown)
        self._ended(name)

    def lent(self, name: str) -> None:
        """A tile copied from the lending store (``--reuse``) by a worker."""
        self.report.tiles_reused += 1
        self.report.tiles_done_before += 1  # as a copy before the run counts it
        self._ended(name)

    def lend_refused(self, tile: Tile) -> None:
        """A tile whose copy its bytes refused: computed instead, so its pairs join the bar's."""
        self.report.tiles_lend_refused += 1
        if self.bar is not None:
            self.bar.total += tile.pairs
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _BatchProgress:
    """The progress bar advanced batch by batch inside a tile (in-process runs), counting what
    it showed so that the tile's end adds only the rest."""

    def __init__(self, bar):
        self.bar, self.shown = bar, 0

    def update(self, pairs: int) -> None:
        if self.bar is not None:
            self.bar.update(pairs)
            self.shown += pairs


def _run_on_dask(client, path, key, recipe, blocks, todo, threads, symmetric, book, lending=None) -> None:
    """The tiles ``todo`` as tasks on ``client``'s workers, each counted in ``book`` as it ends,
    after the self blocks (of ``blocks``, those not yet recorded) that they read; ``lending``:
    (the lender's absolute path, its name as given, the tiles it lends), each copied by a worker
    (:func:`run_lend_task`), or computed if its copy fails. A self block is submitted with the
    first tile that reads it: tiles that are all lent need none."""
    from distributed import as_completed

    # the recipe travels as pickled bytes: Dask would otherwise look inside its containers
    recipe_f = client.scatter([pickle.dumps(recipe)], broadcast=True)[0]
    missing = {(w, b): sl for w, b, sl in blocks}
    self_futures = {}

    def compute(t):  # a tile waits for the self records it reads
        needs = sorted({("x1", t.i), ("x1" if symmetric else "x2", t.j)})
        for w, b in needs:
            if (w, b) in missing and (w, b) not in self_futures:
                self_futures[(w, b)] = client.submit(run_self_task, path, key, recipe_f, w, b, missing[(w, b)],
                                                     threads, key=f"cnngp-self-{key[:12]}-{w}-{b}", pure=False)
        deps = [self_futures[n] for n in needs if n in self_futures]
        return client.submit(_after, run_tile_task, deps, path, key, recipe_f, t, threads,
                             key=f"cnngp-{t.name}-{key[:12]}", pure=False)

    source, origin, lend = lending or (None, None, [])
    # copies first: they wait for nothing, and are I/O where the tiles computed are arithmetic
    lend_futures = {client.submit(run_lend_task, path, source, origin, t, key=f"cnngp-lend-{t.name}-{key[:12]}",
                                  pure=False): t for t in lend}
    futures = list(lend_futures) + [compute(t) for t in todo]
    running = as_completed(futures)
    try:
        for future in running:
            if future in lend_futures:
                tile = lend_futures[future]
                if future.result():
                    book.lent(tile.name)
                else:
                    book.lend_refused(tile)
                    futures.append(compute(tile))
                    running.add(futures[-1])
                continue
            name, pairs, _ = future.result()
            book.computed(name, pairs)
        book.report.self_blocks_computed = len(self_futures)
    except BaseException:
        client.cancel(futures + list(self_futures.values()), force=True)
        raise


def _workers_lost(error: BaseException) -> bool:
    """Whether ``error`` is how Dask reports a run whose workers died: its futures cancelled
    (every worker gone) or a task given up after killing workers (``KilledWorker``)."""
    import concurrent.futures

    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - a declared dependency
        KilledWorker = ()
    return isinstance(error, (concurrent.futures.CancelledError, KilledWorker))


def _dashboard(client) -> str | None:
    """The dashboard's address, when the scheduler serves one (it needs bokeh)."""
    import importlib.util

    if client.cluster is not None and importlib.util.find_spec("bokeh") is None:
        return None
    try:
        return client.dashboard_link
    except Exception:  # a scheduler without an HTTP server
        return None


def _after(function, deps, *args):
    """Run ``function(*args)`` once ``deps`` (futures Dask resolves before calling) are done."""
    return function(*args)
