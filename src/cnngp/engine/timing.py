"""Time estimates a user can trust: a short timing of the actual network on the actual machine,
scaled by the work of every stage of a job.

The operation count of :func:`cnngp.engine.gram.estimate_cost` prices a pair from the plan
alone and serves the quick refusals (memory, absurd sizes). Before a long job starts, this
module times the real thing instead — a few pairs of the same network, dtype, engine and
thread count on this machine, under its present load — and prices the job from it:

* a Gram stage of P pairs and I images costs ``P · seconds_per_pair + I · seconds_per_image``
  (the self pass, :class:`~cnngp.engine.gram.GramPlan`'s stage 1); a flip-averaged plan's pair
  is two kernel evaluations (K(x, x') and K(x, flip x')), and its timed rate holds both;
* a run on W Dask workers adds the start of the cluster and of each worker (importing torch and
  cnngp, numba loading its compiled kernels: :attr:`Rates.warmup_seconds`) and lasts as long as
  the busiest worker, found by handing the tiles out in the store's order to whichever worker
  is free first (what Dask's scheduler does with equal tasks).

The machine's load average at the timing is recorded and printed with every estimate: a
timing taken on a busy machine prices the job on that busy machine.
"""

from __future__ import annotations

import heapq
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["Rates", "measure", "Stage", "Estimate", "estimate", "schedule_seconds", "load_average"]

#: seconds of pairs the timing aims for (it takes at least 4 and at most MAX_SIDE² pairs)
TARGET_SECONDS = 1.0
#: the timed block's largest side: enough pairs per call that a cheap network's per-call
#: overhead is priced as in a real run's batches
MAX_SIDE = 48
#: a local Dask cluster: the scheduler and the nanny processes before workers import anything
CLUSTER_START_SECONDS = 1.5
#: closing a local cluster (its workers and scheduler) at the end
CLUSTER_STOP_SECONDS = 1.0
#: a fresh process's start (interpreter, torch, cnngp) where this one cannot tell (2-core VM: 2-3 s)
TYPICAL_START_SECONDS = 3.0
#: this process is taken as freshly started (a command) when younger than this (seconds)
START_AGE_LIMIT = 20.0


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None


def _process_start_seconds() -> float | None:
    """Seconds from this process's start to now (Linux): what a fresh worker process spends
    before it can compute, as this one spent it (interpreter, torch, cnngp)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass(frozen=True)
class Rates:
    """What one timing measured (seconds) for one plan on this machine."""

    seconds_per_pair: float
    seconds_per_image: float
    warmup_seconds: float  # first call: numba loading (or compiling) the kernels, caches
    start_seconds: float  # a fresh process before it computes (imports), see _process_start_seconds
    threads: int
    pairs_timed: int
    load_average: float | None

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        load = "" if self.load_average is None else f", load average {self.load_average:g}"
        return (f"timed here: {self.pairs_timed} pairs at {self.seconds_per_pair * 1e3:.3g} ms per pair, "
                f"{self.seconds_per_image * 1e3:.3g} ms per image (self pass), {self.threads} "
                f"thread{'s' if self.threads != 1 else ''}{load}")


def measure(plan, images, threads: int | None = None) -> Rates:
    """Time ``plan`` (a :class:`~cnngp.engine.gram.GramPlan`) on a few of ``images`` (validated,
    ``plan.images(...)``, at least one; repeated where fewer than needed): a warm-up block, the
    self pass of 8 images and a rectangular block of k × k pairs, k chosen so the block takes
    about a second (2 ≤ k ≤ MAX_SIDE).
    ``threads``: torch threads for the timing (the caller's are restored)."""
    x = torch.as_tensor(images)
    reps = int(math.ceil(MAX_SIDE / max(1, x.shape[0])))
    x = torch.cat([x] * reps)[:MAX_SIDE]  # MAX_SIDE images, repeating a short set
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        start = _process_start_seconds()
        t0 = time.perf_counter()
        rec = plan.self_records(x[:2])
        plan.block(x[:1], rec.take(slice(0, 1)), x[1:2], rec.take(slice(1, 2)))
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        rec = plan.self_records(x[:8])
        per_image = (time.perf_counter() - t0) / 8
        k = 2
        t0 = time.perf_counter()
        plan.block(x[:k], rec.take(slice(0, k)), x[k : 2 * k], rec.take(slice(k, 2 * k)))
        per_pair = (time.perf_counter() - t0) / (k * k)
        k = max(2, min(MAX_SIDE, int(math.sqrt(TARGET_SECONDS / max(per_pair, 1e-6)))))
        if k > 2:  # a bigger block: less of the per-call overhead in the rate
            rec = plan.self_records(x[:k])
            flipped = x[:k].flip(0)
            rec2 = plan.self_records(flipped)
            t0 = time.perf_counter()
            plan.block(x[:k], rec.take(slice(0, k)), flipped[:k], rec2.take(slice(0, k)))
            per_pair = (time.perf_counter() - t0) / (k * k)
        return Rates(
            seconds_per_pair=per_pair,
            seconds_per_image=per_image,
            warmup_seconds=warmup,
            # a process older than START_AGE_LIMIT (pytest, a notebook) says nothing about
            # a fresh one: then the typical start
            start_seconds=TYPICAL_START_SECONDS if start is None or start > START_AGE_LIMIT else start,
            threads=torch.get_num_threads(),
            pairs_timed=k * k,
            load_average=load_average(),
        )
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Stage:
    """One Gram computation of a job: ``n1`` images against ``n2`` (None: a symmetric
    ``n1`` × ``n1`` matrix, whose upper triangle is computed); ``flip``: flip-averaged, every
    pair also against the mirrored image (docs/maths.md §9), so twice the kernel evaluations
    (priced by the timed rate of the flip plan, whose pairs hold both)."""

    name: str
    n1: int
    n2: int | None = None
    flip: bool = False

    @property
    def pairs(self) -> int:
        return self.n1 * (self.n1 + 1) // 2 if self.n2 is None else self.n1 * self.n2

    @property
    def images(self) -> int:
        return self.n1 + (self.n2 or 0)

    @property
    def evaluations(self) -> int:
        """Kernel evaluations of the pair pass: the pairs, twice with ``flip``."""
        return self.pairs * (2 if self.flip is True else 1)

    def describe_pairs(self, pairs: int | None = None) -> str:
        """``"1,234 pairs"``, with ``flip`` ``"1,234 pairs × 2 (flip-averaged)"``."""
        pairs = self.pairs if pairs is None else pairs
        return f"{pairs:,} pairs" + (" × 2 (flip-averaged)" if self.flip is True
                                     else " (mirror term)" if self.flip else "")


@dataclass(frozen=True)
class Estimate:
    seconds: float
    lines: tuple  # one line per stage and one for the total
    #: the part of ``seconds`` a command pays once whatever it computes: its own start and first
    #: call's warm-up, and a cold cluster's start and stop (:func:`total_seconds`)
    fixed_seconds: float = 0.0

    def describe(self) -> str:
        return "\n".join(self.lines)


def schedule_seconds(task_seconds, workers: int, start_seconds=0.0) -> float:
    """When the last of ``task_seconds`` (in submission order) finishes on ``workers`` workers
    that each take the next task as soon as they are free, each after ``start_seconds``."""
    free = [float(start_seconds)] * max(1, int(workers))
    heapq.heapify(free)
    end = float(start_seconds)
    for s in task_seconds:
        t = heapq.heappop(free) + float(s)
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def estimate(rates: Rates, stages, *, workers: int | None = None, tile_pairs=None,
             images_per_task: int = 64, cold_workers: bool = True) -> Estimate:
    """The time of ``stages`` (a list of :class:`Stage`) at ``rates``: in this process
    (``workers`` None), or on a local Dask cluster of ``workers`` single-task processes whose
    tiles (``tile_pairs``: the pairs of each tile of every stage, in order; default one task
    per stage) and self-pass blocks of ``images_per_task`` are scheduled as they would run;
    ``cold_workers``: a cluster started for the job (False: running workers, warm)."""
    # the command's own start (interpreter, imports, the first call's warm-up): what `time cnngp
    # ...` measures besides the work
    lines, total = [], rates.start_seconds + rates.warmup_seconds
    tiles = list(tile_pairs) if tile_pairs is not None else [[st.pairs] for st in stages]
    if not workers:
        for st, pairs in zip(stages, tiles):
            s = sum(pairs) * rates.seconds_per_pair + st.images * rates.seconds_per_image
            total += s
            lines.append(f"  {st.name}: {st.describe_pairs(sum(pairs))}, {st.images:,} images: about {_human(s)}")
        lines.append(f"estimate: about {_human(total)} with this command's start ({rates.describe()})")
        return Estimate(total, tuple(lines), rates.start_seconds + rates.warmup_seconds)
    # a cold worker imports more than this command had when it was timed (distributed, the
    # task modules): at least the typical start, then numba loads the kernels on its first call
    worker = max(rates.start_seconds, TYPICAL_START_SECONDS) + rates.warmup_seconds
    start = CLUSTER_START_SECONDS + worker + CLUSTER_STOP_SECONDS if cold_workers else 0.0
    for st, pairs in zip(stages, tiles):
        blocks = [min(images_per_task, st.images - i) * rates.seconds_per_image
                  for i in range(0, st.images, images_per_task)]
        self_end = schedule_seconds(blocks, workers)
        tile_end = schedule_seconds([p * rates.seconds_per_pair for p in pairs], workers)
        s = self_end + tile_end
        total += s
        lines.append(f"  {st.name}: {st.describe_pairs(sum(pairs))} in {len(pairs)} tile(s), {st.images:,} images, "
                     f"on {workers} worker(s): about {_human(s)}")
    total += start
    lines.append(f"  start: this command, the cluster and its workers about {_human(start + rates.start_seconds)}")
    lines.append(f"estimate: about {_human(total)} on {workers} worker(s) ({rates.describe()})")
    return Estimate(total, tuple(lines), rates.start_seconds + rates.warmup_seconds + start)


def total_seconds(plans) -> float:
    """The time of one command that computes every plan of ``plans`` (dry runs' dictionaries:
    ``estimated_seconds`` and ``fixed_seconds``, :class:`Estimate`'s), one after another: each
    plan's own work, and the fixed part (the command's start, a cluster's) once, the first
    plan's: the later ones were timed later in the same command, so their "start" also holds
    the planning before them."""
    plans = list(plans)
    if not plans:
        return 0.0
    return sum(p["estimated_seconds"] - p.get("fixed_seconds", 0.0) for p in plans) + plans[0].get("fixed_seconds", 0.0)


def _human(s: float) -> str:
    from cnngp.engine.resources import human_seconds

    return human_seconds(s)
