"""Lending: the finished entries of one computation copied into another's store (``--reuse``).

Two computations of the same kernel (network, kernel type, flip term, dtype) whose images
begin alike share the pairs of the images both have: a Gram matrix grown from N to N'
images, the kernel of a subset that begins a larger one's, a store moved to a GPU with larger
tiles, a sweep of a few of the readouts another computed. Those pairs are computed once and
lent, each readout the borrower computes taken from the lender's row of it.

The lender is a kernel store (``K.zarr``, :mod:`cnngp.engine.store`) or a tile archive (its
portable copy, ``archive.json``: :mod:`cnngp.engine.archive`), of any tile size. Its images
must begin as the borrower's do, compared by the sha256 it recorded of its images when it has
fewer, or with the images it keeps when it has more (a store; an archive keeps none, so it
lends only to a kernel on at least its images). A store's kept images also settle a sha256
that differs: the same images preprocessed on another machine differ in their last bits, and
are accepted within rounding (:func:`same_to_rounding`). A borrower's tile is lent when every tile of
the lender that holds part of its block is recorded as done; it is then cut from, or assembled
out of, those tiles (below a symmetric lender's diagonal, the mirror chunks), each read whole
once and checked against its record's sha256 as it is copied. A part that fails the check
makes the tile computed instead, never trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnngp.engine.archive import archive_tile, is_archive, read_archive_header, read_archived_tile
from cnngp.engine.gram import Tile
from cnngp.engine.storage import fingerprint
from cnngp.engine.store import (
    IDENTITY_KEYS, STORE_FORMAT, KernelStore, TiledKernel, difference_words, _checksum, _first_difference, _read_json,
    same_spec, same_to_rounding,
)
from cnngp.errors import CNNGPError

__all__ = ["LENDING_KEYS", "LenderRefused", "Lender", "open_source", "open_lender", "source_tile",
           "refuse_lending_to_itself", "lendable_tiles", "lend_tile", "reuse_tiles", "holds_readouts", "readout_rows"]

#: what a computation lends its entries by: its identity but for its images, their number, its
#: tile size (a block of any size is cut from, or assembled out of, the lender's tiles) and its
#: readouts (a lender of more readouts lends those it shares: :func:`readout_rows`)
LENDING_KEYS = tuple(k for k in IDENTITY_KEYS if k not in ("x1_sha256", "x2_sha256", "shape", "tile", "readouts"))


def readout_rows(lender_attrs: dict, borrower_attrs: dict) -> list | None | str:
    """Where the borrower's readouts lie on the lender's leading axis: None when the two hold
    the same readouts (every row, in order); else the lender's rows of the borrower's, in its
    order (per kernel type, NNGP then NTK, as stores lay them out); or, as a string, why the
    lender cannot lend them (the readouts it lacks)."""
    have, want = lender_attrs.get("readouts"), borrower_attrs.get("readouts")
    if same_spec(have, want):
        return None
    if not have or not want:
        return "other readouts"
    index: dict = {}
    for i, spec in enumerate(have):
        index.setdefault(json.dumps(spec, sort_keys=True), i)
    keys = [json.dumps(spec, sort_keys=True) for spec in want]
    missing = [w for w, k in zip(want, keys) if k not in index]
    if missing:
        corr = (missing[0] or {}).get("correlation") if isinstance(missing[0], dict) else None
        return f"it lacks {len(missing)} of this computation's {len(want)} readouts (the first: {corr})"
    per_kind = len(have)
    kinds = max(1, int(lender_attrs["shape"][0]) // per_kind)
    return [kind * per_kind + index[k] for kind in range(kinds) for k in keys]

#: a store's ``flip`` as words
_FLIP_WORDS = {None: "no flip", False: "no flip", True: "flip-averaged", "mirror": "the mirror term"}


class LenderRefused(CNNGPError):
    """A store or archive named to lend tiles (``--reuse``) that cannot lend to this
    computation: another computation, or images that this one's do not begin with
    (:func:`open_lender`)."""


class Lender(TiledKernel):
    """A kernel store or a tile archive as lending reads it: its identity (``attrs``), shape
    and tiling, its tiles' records, and each tile's chunk checked against its record."""

    kind = "kernel store"

    #: bytes of checked chunks kept for the next tiles (a lender of larger tiles serves
    #: several borrower tiles from one chunk: each is read and hashed once, not once per tile)
    CACHE_BYTES = 256 * 1024**2

    def __init__(self, path, attrs: dict):
        self.path = Path(path)
        self.attrs = attrs
        self._cache: dict = {}

    def checked_chunk(self, tile: Tile, mirrored: bool) -> tuple[np.ndarray, dict] | None:
        """:meth:`chunk`, keeping the last few checked ones."""
        key = (tile.name, mirrored)
        if key in self._cache:
            return self._cache[key]
        loaded = self.chunk(tile, mirrored)
        if loaded is not None and loaded[0].nbytes <= self.CACHE_BYTES:
            while self._cache and sum(c.nbytes for c, _ in self._cache.values()) + loaded[0].nbytes > self.CACHE_BYTES:
                self._cache.pop(next(iter(self._cache)))  # the oldest first
            self._cache[key] = loaded
        return loaded

    def record(self, tile: Tile) -> dict | None:
        raise NotImplementedError

    def holds(self, tile: Tile, mirrored: bool, record: dict | None) -> bool:
        """Whether ``record`` says the lender holds ``tile`` (its mirror chunk if ``mirrored``)."""
        return (record or {}).get("rows") == [tile.rows.start, tile.rows.stop] and \
            (record or {}).get("cols") == [tile.cols.start, tile.cols.stop]

    def chunk(self, tile: Tile, mirrored: bool) -> tuple[np.ndarray, dict] | None:
        """``(chunk, record)``: the block ``tile`` computed (its mirror chunk if ``mirrored``),
        checked against its record; None where it is missing, unreadable or does not match."""
        raise NotImplementedError

    def first_images(self, which: str, n: int) -> np.ndarray | None:
        """Its first ``n`` images of ``which`` ("x1", "x2"), or None where it keeps none, or
        where those it keeps are not those it computed on (by the sha256 it recorded)."""
        return None


class _StoreLender(Lender):
    def __init__(self, store: KernelStore):
        super().__init__(store.path, store.attrs)
        self.store = store

    def record(self, tile):
        return self.store._record(tile.name)

    def holds(self, tile, mirrored, record):
        return super().holds(tile, mirrored, record) and (not mirrored or "mirror_sha256" in record)

    def chunk(self, tile, mirrored):
        record = self.record(tile) or {}
        if not self.holds(tile, mirrored, record):
            return None
        try:
            block = np.asarray(self.store.kernel[:, tile.cols, tile.rows] if mirrored
                               else self.store.kernel[:, tile.rows, tile.cols])
        except Exception:  # an unreadable chunk
            return None
        return (block, record) if record.get("mirror_sha256" if mirrored else "sha256") == _checksum(block) else None

    def first_images(self, which, n):
        # the images it keeps must be those it computed on: the sha256 it recorded of them
        if which in self.store.damaged_images():
            return None
        try:
            return np.asarray(self.store.images(which, slice(0, n)))
        except Exception:  # an unreadable chunk
            return None


class _ArchiveLender(Lender):
    kind = "tile archive"

    def record(self, tile):
        return _read_json(self.path / f"{tile.name}.json")

    def holds(self, tile, mirrored, record):
        # an archive keeps each tile once: its mirror is the transpose, except for offset sums
        # (whose transpose also reverses the offsets, by a shape the archive does not keep)
        return super().holds(tile, mirrored, record) and not (mirrored and self.attrs.get("offsets"))

    def chunk(self, tile, mirrored):
        record = self.record(tile) or {}
        if not self.holds(tile, mirrored, record):
            return None
        loaded = read_archived_tile(self.path, tile, self.shape[0], self.attrs["dtype"])
        if loaded is None or isinstance(loaded, str):
            return None
        block, record = loaded
        return (np.ascontiguousarray(np.swapaxes(block, 1, 2)) if mirrored else block), record


def open_source(source, what: str = "--reuse") -> Lender:
    """The kernel store or tile archive at ``source``, opened to lend (read only)."""
    if is_archive(source):
        header = read_archive_header(source, what)
        return _ArchiveLender(source, dict(header.get("identity") or {}))
    if Path(source).is_dir() and not (Path(source) / "zarr.json").is_file():
        raise CNNGPError(f"{what}: {str(source)!r} is neither a kernel store (zarr.json) nor a tile archive "
                         "(archive.json); give the store or tile archive to copy tiles from")
    return _StoreLender(KernelStore.open(source, what=what))


def source_tile(source) -> int | None:
    """The tile size of the store or archive at ``source``, None when it is neither."""
    return archive_tile(source) if is_archive(source) else KernelStore.stored_tile(source)


def holds_readouts(path, heads) -> bool:
    """Whether a kernel store or tile archive exists at ``path`` and holds the readouts ``heads``
    (among others, perhaps: it lends those it shares, :func:`readout_rows`); ``heads`` None:
    whether it holds offset sums (``cnngp learn``'s stores), which lend only to offset sums."""
    if not ((Path(path) / "zarr.json").is_file() or is_archive(path)):
        return False
    attrs = open_source(path).attrs
    if heads is None or attrs.get("offsets"):
        return heads is None and bool(attrs.get("offsets"))
    return not isinstance(readout_rows(attrs, {"readouts": [h.to_spec() for h in heads]}), str)


def open_lender(source, identity: dict, x1, x2, what: str = "--reuse") -> Lender:
    """The kernel store or tile archive at ``source``, checked as a lender to the computation
    ``identity`` on images ``x1`` (and ``x2``; None: x1 × x1), as stored (the plan's dtype): one
    of the same computation (:data:`LENDING_KEYS`: network, kernels, flip, dtype) that holds
    every readout of ``identity`` (:func:`readout_rows`), whatever its tile size, on images
    that begin as ``x1`` (and ``x2``) begin: its images are the first rows of ``x1`` (compared
    by the sha256 it recorded of its inputs), or ``x1`` is the first rows of its images
    (compared with the images a store keeps; an archive keeps none). It lends the block of the images both have. Anything else is refused, naming
    ``what``. Nothing is written."""
    source = Path(source)
    other = open_source(source, what)
    wanted = {"format": STORE_FORMAT, **identity}
    key = _first_difference(other.attrs, wanted, LENDING_KEYS)
    if key is not None:
        values = ""
        if key in ("dtype", "flip"):  # short values: say both
            show = (lambda v: _FLIP_WORDS.get(v, v)) if key == "flip" else str
            values = f" ({show(other.attrs.get(key))}; this computation: {show(wanted.get(key))})"
        same = "network, dtype" if wanted.get("offsets") else "network, readouts, dtype"
        raise LenderRefused(f"{what}: {str(source)!r} holds a kernel of different "
                            f"{difference_words(key, other.attrs)}{values}; only a store or tile archive of the "
                            f"same computation ({same}) on images that begin as these do lends its tiles")
    rows = readout_rows(other.attrs, wanted)
    if isinstance(rows, str):
        raise LenderRefused(f"{what}: {str(source)!r} holds a kernel of different readouts ({rows}); a store or "
                            "tile archive lends only readouts it holds")
    if other.symmetric != (x2 is None):
        kinds = ("x1 × x1", "x1 × x2")
        raise LenderRefused(f"{what}: {str(source)!r} holds a {kinds[not other.symmetric]} kernel; this one is "
                            f"{kinds[x2 is not None]}")
    _, n1, n2 = other.shape
    for which, n, x in (("x1", n1, x1), ("x2", n2, x2)):
        if which == "x2" and x2 is None:
            break
        if n <= x.shape[0]:  # its images are the first of these: by the hash it recorded of them
            same = fingerprint(np.ascontiguousarray(x[:n])) == other.attrs.get(f"{which}_sha256")
            if not same and isinstance(other, _StoreLender):  # or, to rounding, by those it keeps
                same = same_to_rounding(other.first_images(which, n), x[:n])
            whose = f"{n} images ({which}) that are not the first {n} of this computation's {x.shape[0]}"
        else:  # these are the first of its images: by the images it keeps
            kept = other.first_images(which, x.shape[0])
            if kept is None and isinstance(other, _StoreLender):
                raise LenderRefused(f"{what}: {str(source)!r}: its stored images ({which}) cannot be read or do not "
                                    "match the sha256 it recorded of the images it computed on, so nothing shows "
                                    "that these are its first; it lends nothing")
            if kept is None:
                raise LenderRefused(
                    f"{what}: {str(source)!r} is a tile archive of a kernel on more images ({which}: {n}) than "
                    f"this computation has ({x.shape[0]}), and an archive keeps no images to check that these "
                    "are its first; restore it into a store first (its own command with --archive DIR), "
                    "then give that store to --reuse")
            same = kept is not None and (fingerprint(np.ascontiguousarray(x)) == fingerprint(kept)
                                         or same_to_rounding(kept, x))
            whose = (f"{n} images ({which}) whose first {x.shape[0]} are not this computation's "
                     f"{x.shape[0]}")
        if not same:
            zca = ((other.attrs.get("preprocessing") or {}).get("zca") or {})
            whitened = "" if not zca else (
                f"; its images were whitened by ZCA of strength {zca.get('strength')} fitted on "
                f"{zca.get('fitted_on_images') or 'its training images'}, and a whitening fitted on other "
                "images makes other images")
            archived = "" if isinstance(other, _StoreLender) else (
                " (the same images preprocessed on another machine, whose last bits differ? an archive keeps no "
                "images to compare: restore it into a store first, its own command with --archive DIR, which "
                "checks them by computing pairs again, then give that store to --reuse)")
            raise LenderRefused(f"{what}: {str(source)!r} was computed on {whose}; it lends tiles only to a "
                                "kernel whose images begin as its do (the same images first, in the same order "
                                f"and preprocessing){whitened}{archived}")
    return other


def refuse_lending_to_itself(source, path, what: str = "--reuse") -> None:
    """Refuse ``source`` as the lender of the store at ``path`` when it is that store."""
    if Path(source).resolve() == Path(path).resolve():
        raise CNNGPError(f"{what}: {str(source)!r} is the store being computed; give another store of the same "
                         "computation")


def _pieces(lender: Lender, rows: slice, cols: slice) -> list | None:
    """Where the lender holds the block ``rows × cols`` of its matrix: a list of ``(tile,
    mirrored, src, dst)``, one per block of its tiling that the block meets. ``tile``: the
    lender's tile that computed that part; ``mirrored``: the part lies at its mirror place
    (below the diagonal of a symmetric lender); ``src``: (rows, cols) slices of that tile's
    chunk there, ``dst``: of the block. None when the block is not within the lender's images."""
    _, n1, n2 = lender.shape
    if rows.stop > n1 or cols.stop > n2:
        return None
    t, symmetric = lender.tile, lender.symmetric
    pieces = []
    for i in range(rows.start // t, (rows.stop - 1) // t + 1):
        for j in range(cols.start // t, (cols.stop - 1) // t + 1):
            mirrored = symmetric and i > j
            a, b = (j, i) if mirrored else (i, j)  # the computed tile: a <= b when symmetric
            tile = Tile(a, b, slice(a * t, min((a + 1) * t, n1)), slice(b * t, min((b + 1) * t, n2)),
                        diagonal=symmetric and a == b, mirror=symmetric and a != b)
            r0, r1 = max(rows.start, i * t), min(rows.stop, (i + 1) * t)
            c0, c1 = max(cols.start, j * t), min(cols.stop, (j + 1) * t)
            pieces.append((tile, mirrored, (slice(r0 - i * t, r1 - i * t), slice(c0 - j * t, c1 - j * t)),
                           (slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start))))
    return pieces


def lendable_tiles(source, identity: dict, x1: np.ndarray, x2: np.ndarray | None, tiles: list,
                   what: str = "--reuse") -> tuple:
    """``(lender, tiles)``: the lender at ``source`` (:func:`open_lender`, which refuses any
    other) and those of ``tiles`` it would lend: those within the images both have whose block
    it holds in tiles it has recorded as done (:func:`_pieces`: one tile at the same place when
    the tile sizes agree, else parts of several). Their bytes are read only when copied
    (:func:`lend_tile`, which checks them then): a tile any part of which no longer matches its
    record is computed after all, not lent. Nothing is read but records, nothing is written."""
    other = open_lender(source, identity, x1, x2, what)
    records: dict = {}

    def held(tile: Tile, mirrored: bool) -> bool:
        if tile.name not in records:
            records[tile.name] = other.record(tile)
        return other.holds(tile, mirrored, records[tile.name])

    lent = []
    for t in tiles:
        pieces = _pieces(other, t.rows, t.cols)
        if pieces is not None and all(held(tile, mirrored) for tile, mirrored, _, _ in pieces):
            lent.append(t)
    return other, lent


def lend_tile(store: KernelStore, lender: Lender, tile: Tile, origin: str) -> bool:
    """Copy ``tile`` from ``lender`` (:func:`lendable_tiles` chose it) into ``store``: its block,
    assembled from the lender's chunks that hold it (:func:`_pieces`), each read whole once and
    checked against its tile's record (the last few are kept: :meth:`Lender.checked_chunk`),
    then written with its mirror and a record that names the lender (``reused_from``:
    ``origin``) and keeps the lender's time: its tiles' seconds in
    proportion to the pairs taken from each (:func:`_pairs_in`). Returns False, writing
    nothing, for a block any part of which does not match its record or cannot be read: the
    tile is then computed."""
    pieces = _pieces(lender, tile.rows, tile.cols)
    if pieces is None:
        return False
    rows = readout_rows(lender.attrs, store.attrs)  # the lender's readouts this store holds
    if isinstance(rows, str):
        return False
    block = np.empty((store.shape[0], tile.rows.stop - tile.rows.start, tile.cols.stop - tile.cols.start),
                     dtype=np.dtype(lender.attrs["dtype"]))
    spent = {"seconds": 0.0, "cpu_seconds": 0.0}
    for part, mirrored, src, dst in pieces:
        loaded = lender.checked_chunk(part, mirrored)
        if loaded is None:
            return False
        chunk, record = loaded
        part_block = chunk[:, src[0], src[1]]
        block[:, dst[0], dst[1]] = part_block if rows is None else part_block[rows]
        share = _pairs_in(part, mirrored, src) / part.pairs  # of the pairs that tile computed
        for key in spent:  # unknown (an older record) for one part: unknown for the tile
            spent[key] = None if spent[key] is None or record.get(key) is None else spent[key] + share * record[key]
    store.write_tile(tile, block, spent["seconds"], spent["cpu_seconds"], origin=origin)
    return True


def _pairs_in(tile: Tile, mirrored: bool, src: tuple) -> int:
    """How many of the pairs ``tile`` computed lie in its part ``src`` (slices of its chunk):
    all its entries off the diagonal of a symmetric matrix or in a rectangular one; on a
    diagonal tile only those with row <= column (the others are their mirrors); none in a
    mirror chunk (each of its entries is a pair the tile's own chunk holds). So a lender's
    seconds are shared out by pairs, and a tile lent in parts is charged its time once."""
    if mirrored:
        return 0
    rows, cols = src
    if not tile.diagonal:
        return (rows.stop - rows.start) * (cols.stop - cols.start)
    return sum(max(0, cols.stop - max(r, cols.start)) for r in range(rows.start, rows.stop))


def reuse_tiles(store: KernelStore, source, tiles: list, what: str = "--reuse", refused: list | None = None) -> list:
    """Copy into ``store``, one after the other, the tiles of ``tiles`` that the store or tile
    archive at ``source`` lends (:func:`lendable_tiles`, :func:`lend_tile`). Returns the tiles
    copied; those whose copy failed its checks (a part that no longer matches its record, or
    cannot be read) are appended to ``refused``. Growing a Gram matrix from N to N' > N images
    this way computes only the pairs with a new image. (A run on a cluster has its workers copy
    them instead, tile by tile.)"""
    refuse_lending_to_itself(source, store.path, what)
    identity = {k: store.attrs.get(k) for k in IDENTITY_KEYS}
    x2 = None if store.symmetric else store.group["images"]["x2"]
    other, candidates = lendable_tiles(source, identity, store.group["images"]["x1"], x2, tiles, what)
    lent = []
    for tile in candidates:
        (lent if lend_tile(store, other, tile, str(source)) else refused if refused is not None else []).append(tile)
    return lent
