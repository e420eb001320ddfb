"""Tile archives: a compact, portable copy of a kernel store's finished tiles.

A kernel store (:mod:`cnngp.engine.store`) is fast to fill and to read but large (every
chunk raw, mirror tiles written twice, stage-1 records beside them) and it lives on one file
system. A run longer than the life of its machine (a cluster's scratch space that is purged,
a cloud VM that is replaced, a laptop session) needs its finished work somewhere that
survives: a folder that can be copied, synced or committed. That is a tile archive:

- ``archive.json``: the store's identity (network spec, readouts, sha256 of the inputs,
  dtype, tile size, shape; :data:`cnngp.engine.store.IDENTITY_KEYS`). An archive restores
  only into a store of exactly that computation; any other is refused, naming what differs.
- ``tile-I-J.bin`` + ``tile-I-J.json``: one computed tile (not its mirror), losslessly
  compressed: the readouts of one pair are made adjacent, successive values are differenced
  as integers (neighbouring readouts agree in their leading bits), then byte-shuffled and
  zstd-compressed by Blosc (numcodecs). A CNNGP-14 tile of 27 readouts in float32 keeps
  about a third of its bytes. The record holds the sha256 of the raw tile, the same checksum
  the store keeps, and is written (atomically) only after the data.

:func:`cnngp.engine.distributed.store_kernel` with ``archive=DIR`` restores every tile
the store lacks from DIR before computing, saves every tile the store holds but DIR lacks,
and saves each new tile as it finishes; a corrupted archived tile is reported and
recomputed, never trusted. An archive also lends its tiles to another computation that shares
its pairs, as its store would (``--reuse DIR``, :mod:`cnngp.engine.lending`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from cnngp.engine.gram import Tile, tile_plan
from cnngp.engine.storage import check_own_folder
from cnngp.engine.store import (
    IDENTITY_KEYS, IMAGE_KEYS, KernelStore, difference_words, same_spec, _atomic_json, _checksum, _first_difference, _read_json,
)
from cnngp.errors import CNNGPError

__all__ = ["TileArchive", "ARCHIVE_FORMAT", "archive_info", "is_archive", "check_archive_folder",
           "check_archive_apart", "check_archive_identity", "archive_images_differ", "rekey_archive_images",
           "restorable_tiles", "archive_tile",
           "read_archived_tile", "read_archive_header",
           "encode_tile", "decode_tile"]

#: version tag of the archive layout
ARCHIVE_FORMAT = "cnngp-tile-archive/1"

#: how a tile's bytes are encoded (recorded with every tile)
CODEC = "readouts-last/delta-int/blosc-zstd9-shuffle"


def _codecs(dtype: np.dtype):
    from numcodecs import Blosc, Delta

    int_type = {4: "<i4", 8: "<i8"}[np.dtype(dtype).itemsize]
    return int_type, Delta(int_type), Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE)


def encode_tile(block: np.ndarray) -> bytes:
    """Lossless bytes of a tile block ``(L, R, C)`` (float32 or float64).

    >>> b = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    >>> np.array_equal(decode_tile(encode_tile(b), b.shape, b.dtype), b)
    True
    """
    block = np.asarray(block)
    if block.dtype not in (np.float32, np.float64):
        raise CNNGPError(f"archive: tiles are float32 or float64, not {block.dtype}")
    int_type, delta, blosc = _codecs(block.dtype)
    # readouts last: one pair's L values side by side, where the integer differences are small
    as_int = np.ascontiguousarray(np.moveaxis(block.astype(block.dtype.newbyteorder("<")), 0, -1)).view(int_type)
    return bytes(blosc.encode(delta.encode(as_int.ravel())))


def decode_tile(data: bytes, shape, dtype) -> np.ndarray:
    """The block :func:`encode_tile` encoded, shape ``(L, R, C)``."""
    dtype = np.dtype(dtype)
    int_type, delta, blosc = _codecs(dtype)
    L, R, C = (int(s) for s in shape)
    flat = delta.decode(np.frombuffer(blosc.decode(data), dtype=int_type))
    if flat.size != L * R * C:
        raise ValueError(f"decoded {flat.size} values, expected {L * R * C}")
    values = np.ascontiguousarray(flat).view(dtype.newbyteorder("<")).reshape(R, C, L)
    return np.ascontiguousarray(np.moveaxis(values, -1, 0)).astype(dtype)


def check_archive_folder(path, what: str = "--archive") -> Path:
    """Refuse, before any work, an archive path cnngp must not write: an empty name, a file or
    link, a non-empty folder that is not a tile archive, or an unwritable parent (missing
    parents are made with the archive)."""
    return check_own_folder(path, what, marker="archive.json", kind="a tile archive",
                            empty_hint="give a folder for the tile archive",
                            foreign_hint="give a new or empty folder", parents_made=True)


def is_archive(path) -> bool:
    """``path`` is a tile archive folder (it has an ``archive.json``)."""
    return (Path(path) / "archive.json").is_file()


def archive_info(path) -> dict:
    """What ``cnngp info DIR`` prints for a tile archive: its computation, tiles archived of
    the plan's total, bytes on disk. A tile counts as archived when its data file is there and
    its record reads as the record of that tile; one with a half (a lone file), an unreadable
    record or an empty data file is listed in ``tiles_damaged``. The data are not decoded
    here: :meth:`TileArchive.load` checks them against the record's checksum on restore."""
    path = Path(path)
    header = read_archive_header(path)
    identity = header.get("identity") or {}
    _, n1, n2 = identity["shape"]
    plan = tile_plan(n1, None if identity.get("x2_sha256") is None else n2, int(identity["tile"]))
    archived, damaged = [], []
    lenders: dict = {}  # tiles another store lent to the archived one (--reuse), by lender
    for t in plan:
        present = [(path / f"{t.name}.{ext}").is_file() for ext in ("json", "bin")]
        if not any(present):
            continue
        record = _read_json(path / f"{t.name}.json") if present[0] else None
        ok = (all(present) and isinstance(record, dict) and (path / f"{t.name}.bin").stat().st_size > 0
              and record.get("rows") == [t.rows.start, t.rows.stop]
              and record.get("cols") == [t.cols.start, t.cols.stop])
        (archived if ok else damaged).append(t)
        if ok and isinstance(record.get("reused_from"), str):
            lenders[record["reused_from"]] = lenders.get(record["reused_from"], 0) + 1
    return {
        "path": str(path), "format": header["format"], "codec": header.get("codec"),
        "shape": identity["shape"], "dtype": identity.get("dtype"), "tile": identity["tile"],
        "tiles_total": len(plan), "tiles_archived": len(archived),
        "tiles_damaged": [t.name for t in damaged],
        "tiles_reused_from": lenders,  # {lender: tiles}: those of the archived tiles it lent
        "pairs_total": sum(t.pairs for t in plan), "pairs_archived": sum(t.pairs for t in archived),
        "bytes": sum(p.stat().st_size for p in path.glob("tile-*.bin")),
        "labels": header.get("labels"), "spec": identity.get("spec"), "created": header.get("created"),
        "versions": header.get("versions"),
        # each time it was accepted for images whose sha256 differed (the same images rounded
        # otherwise: distributed.verify_archive_images), what was checked
        "images_verified": header.get("images_verified") or [],
    }


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # hosts share folders
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _inside(a: str, b: str) -> bool:
    """``a`` is ``b`` or a path inside it."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_archive_apart(archive: Path, store: Path, what: str) -> None:
    """Refuse an archive folder inside the store (``K.zarr/records`` would overwrite its
    records) or a store inside the archive. Paths are compared as written, made absolute and
    normalised (``K.zarr/./records``), and also with their links resolved."""
    pairs = [(os.path.abspath(archive), os.path.abspath(store))]
    try:
        pairs.append((os.path.realpath(archive), os.path.realpath(store)))
    except OSError:
        pass
    for a, s in pairs:
        if _inside(a, s) or _inside(s, a):
            where = "the kernel store itself" if a == s else (
                "inside the kernel store" if _inside(a, s) else "a folder that holds the kernel store")
            raise CNNGPError(f"{what}: {str(archive)!r} is {where} {str(store)!r}; give a tile archive "
                             "folder outside the store (nothing was written)")


def read_archived_tile(folder, tile: Tile, n_readouts: int, dtype) -> tuple[np.ndarray, dict] | str | None:
    """``(block, record)`` of ``tile`` in the archive ``folder`` (``n_readouts`` readouts of
    ``dtype``), None when it is not archived, or why the archived tile is not intact: a record
    of another shape, codec, place or dtype, or bytes that do not decode to its checksum."""
    folder = Path(folder)
    record = _read_json(folder / f"{tile.name}.json")
    if record is None:
        return None
    expected = (int(n_readouts), tile.rows.stop - tile.rows.start, tile.cols.stop - tile.cols.start)
    try:
        if tuple(record.get("shape") or ()) != expected or record.get("codec") != CODEC:
            raise ValueError(f"its record describes shape {record.get('shape')} / codec {record.get('codec')!r}")
        rows, cols = [tile.rows.start, tile.rows.stop], [tile.cols.start, tile.cols.stop]
        if record.get("rows") != rows or record.get("cols") != cols:
            raise ValueError(f"its record is of rows {record.get('rows')} and columns {record.get('cols')}, "
                             f"not the tile's rows {rows} and columns {cols}")
        if record.get("dtype") != str(np.dtype(dtype)):
            raise ValueError(f"its record describes dtype {record.get('dtype')!r}")
        with open(folder / f"{tile.name}.bin", "rb") as f:
            block = decode_tile(f.read(), expected, dtype)
        if _checksum(block) != record.get("sha256"):
            raise ValueError("its bytes do not match its checksum")
    except Exception as e:  # a torn, truncated or foreign file: never trusted
        return str(e) or type(e).__name__
    return block, record


def read_archive_header(path, what: str = "archive") -> dict:
    """The header (``archive.json``) of the tile archive at ``path``: its format checked."""
    path = Path(path)
    try:
        with open(path / "archive.json") as f:
            header = json.load(f)
    except (OSError, ValueError) as e:
        raise CNNGPError(f"{what}: {str(path)!r} has no readable archive.json ({e})") from None
    if not isinstance(header, dict) or header.get("format") != ARCHIVE_FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise CNNGPError(f"{what}: {str(path)!r} is not a {ARCHIVE_FORMAT} folder (format {fmt!r})")
    return header


def check_archive_identity(path, identity: dict, what: str = "--archive") -> bool:
    """Refuse the folder ``path`` as the tile archive of the computation ``identity``
    (:data:`IDENTITY_KEYS`, the store format included) unless it is a new or empty folder
    (False) or an archive of exactly that computation (True). Nothing is written: a run checks
    this before it makes its store, so a refusal leaves nothing behind."""
    path = Path(path)
    check_archive_folder(path, what)
    if not (path / "archive.json").is_file():
        return False
    stored = read_archive_header(path, what)
    key = _first_difference(stored.get("identity") or {}, identity)
    if key is not None:
        values = ""
        if key in ("tile", "dtype"):  # short values: say both
            values = f" ({(stored.get('identity') or {}).get(key)}; this computation: {identity.get(key)})"
        raise CNNGPError(f"{what}: {str(path)!r} holds tiles of a kernel of different "
                         f"{difference_words(key, stored.get('identity') or {})}{values}; "
                         "give the archive of this computation or a new folder (nothing was written)")
    return True


def archive_images_differ(path, identity: dict) -> tuple[str, ...]:
    """The image keys (``x1_sha256``, ``x2_sha256``) on which the archive at ``path`` differs
    from the computation ``identity`` when it differs on nothing else; () otherwise (no
    archive, the same identity, or another difference, which :func:`check_archive_identity`
    refuses).

    Images whose bits differ may still be the same images to rounding: a preprocessing step
    (ZCA whitening: an eigendecomposition and matrix products in float64, then the kernel's
    dtype) gives last bits that depend on the machine's BLAS, so the same command on another
    machine hashes its images differently. The engine then recomputes pairs that cover every
    image against the archived values (:func:`cnngp.engine.distributed.verify_archive_images`)
    before it trusts the archive."""
    path = Path(path)
    if not (path / "archive.json").is_file():
        return ()
    stored = read_archive_header(path).get("identity") or {}
    if _first_difference(stored, identity, tuple(k for k in IDENTITY_KEYS if k not in IMAGE_KEYS)) is not None:
        return ()
    return tuple(k for k in IMAGE_KEYS if not same_spec(stored.get(k), identity.get(k)))


def rekey_archive_images(path, identity: dict, check: dict) -> None:
    """Make the archive at ``path`` the archive of ``identity``'s images (its header's image
    keys), once :func:`cnngp.engine.distributed.verify_archive_images` found its tiles equal
    to rounding on them; ``check`` (what was checked) is appended to the header's
    ``images_verified``, with the image keys it had before."""
    path = Path(path)
    header = read_archive_header(path)
    stored = dict(header.get("identity") or {})
    previous = {k: stored.get(k) for k in IMAGE_KEYS if not same_spec(stored.get(k), identity.get(k))}
    stored.update({k: identity.get(k) for k in IMAGE_KEYS})
    entry = {"previous": previous, **check, "host": socket.gethostname(),
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        _atomic_json(path / "archive.json", {**header, "identity": stored,
                                             "images_verified": [*(header.get("images_verified") or []), entry]})
    except OSError as e:
        raise CNNGPError(f"--archive: rewriting {str(path / 'archive.json')!r} failed ({e.strerror or e})") from None


def restorable_tiles(path, tiles: list) -> list:
    """Those of ``tiles`` the archive at ``path`` records at their place (their bytes are
    checked only when restored): what a dry run prices as restored, not computed."""
    path = Path(path)
    out = []
    for t in tiles:
        record = _read_json(path / f"{t.name}.json")
        if (record or {}).get("rows") == [t.rows.start, t.rows.stop] and \
                (record or {}).get("cols") == [t.cols.start, t.cols.stop] and (path / f"{t.name}.bin").is_file():
            out.append(t)
    return out


def archive_tile(path) -> int | None:
    """The tile size of the archive at ``path``, None when it is not one (or unreadable)."""
    try:
        return int(read_archive_header(path)["identity"]["tile"]) if is_archive(path) else None
    except (CNNGPError, KeyError, TypeError, ValueError):
        return None


class TileArchive:
    """The archive folder ``path`` of the store ``store`` (created if absent).

    Parameters
    ----------
    path : path-like
        A folder: new or empty (made the archive of ``store``), or an archive of the same
        computation as ``store``.
    store : KernelStore
        The store it mirrors.
    what : str
        The argument named in errors (``--archive``).
    """

    def __init__(self, path, store: KernelStore, what: str = "--archive"):
        self.path = Path(path)
        self.store = store
        self.what = what
        identity = {key: store.attrs.get(key) for key in IDENTITY_KEYS}
        header = self.path / "archive.json"
        check_archive_apart(self.path, store.path, what)
        if not check_archive_identity(self.path, identity, what):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                _atomic_json(header, {
                    "format": ARCHIVE_FORMAT, "identity": identity, "codec": CODEC,
                    "labels": store.labels(), "versions": store.attrs.get("versions"),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                })
            except OSError as e:
                raise CNNGPError(f"{what}: creating {str(self.path)!r} failed ({e.strerror or e})") from None

    def _record(self, tile: Tile) -> dict | None:
        return _read_json(self.path / f"{tile.name}.json")

    def intact(self, tile: Tile) -> bool:
        """The archive holds ``tile`` and its bytes decode to its checksum."""
        loaded = self._read(tile)
        return loaded is not None and not isinstance(loaded, str)

    def save(self, tile: Tile) -> None:
        """Copy the store's finished ``tile`` into the archive (data first, then record)."""
        block = np.ascontiguousarray(self.store.kernel[:, tile.rows, tile.cols])
        sha = _checksum(block)
        stored = self.store._record(tile.name) or {}
        if stored.get("sha256") != sha:
            raise CNNGPError(f"{self.what}: tile {tile.name} of {str(self.store.path)!r} is not finished "
                             "(its bytes do not match its record); not archived")
        try:
            _atomic_bytes(self.path / f"{tile.name}.bin", encode_tile(block))
            _atomic_json(self.path / f"{tile.name}.json", {
                "sha256": sha, "shape": list(block.shape), "dtype": str(block.dtype), "codec": CODEC,
                "rows": [tile.rows.start, tile.rows.stop], "cols": [tile.cols.start, tile.cols.stop],
                "seconds": stored.get("seconds"), "cpu_seconds": stored.get("cpu_seconds"), "host": stored.get("host"),
                # a worker's tile not yet checked by the process that ran it stays to be checked
                # wherever it is restored (distributed.spot_check)
                **({"worker": True} if stored.get("worker") is True else {}),
                # a tile another store lent (--reuse) stays the lender's, with the lender's time,
                # wherever it is restored: the store's info and costs keep telling the two apart
                **({"reused_from": stored["reused_from"]} if isinstance(stored.get("reused_from"), str) else {}),
            })
        except OSError as e:
            raise CNNGPError(f"{self.what}: writing tile {tile.name} to {str(self.path)!r} failed "
                             f"({e.strerror or e})") from None

    def vouch(self, tiles) -> None:
        """The archived records of ``tiles`` no longer ask for a check (their store's do not:
        :meth:`KernelStore.vouch`)."""
        for tile in tiles:
            record = self._record(tile)
            if record is not None and record.get("worker") is True:
                _atomic_json(self.path / f"{tile.name}.json", {k: v for k, v in record.items() if k != "worker"})

    def discard(self, tile: Tile) -> None:
        """Remove ``tile`` from the archive (record first: a tile without one is not archived)."""
        for suffix in (".json", ".bin"):
            try:
                os.unlink(self.path / f"{tile.name}{suffix}")
            except FileNotFoundError:
                pass

    def load(self, tile: Tile) -> tuple[np.ndarray, dict] | None:
        """``(block, record)`` of ``tile`` if the archive holds it intact, else None (a
        damaged tile is reported on stderr and left to be recomputed)."""
        loaded = self._read(tile)
        if isinstance(loaded, str):
            print(f"{self.what}: tile {tile.name} in {str(self.path)!r} is damaged ({loaded}); it is recomputed",
                  file=sys.stderr)
            return None
        return loaded

    def _read(self, tile: Tile) -> tuple[np.ndarray, dict] | str | None:
        """``(block, record)``, None (not archived) or why the archived tile is not intact."""
        return read_archived_tile(self.path, tile, self.store.shape[0], self.store.kernel.dtype)

    def restore(self, tiles: list[Tile]) -> list[Tile]:
        """Write every tile of ``tiles`` the archive holds intact into the store (with its
        mirror and record; a worker's tile that no check had vouched for when it was archived
        is restored as such, to be checked, and a tile another store had lent, as lent by it);
        return the ones restored."""
        restored = []
        for tile in tiles:
            loaded = self.load(tile)
            if loaded is not None:
                block, record = loaded
                lender = record.get("reused_from")
                self.store.write_tile(tile, block, record.get("seconds"), record.get("cpu_seconds"),
                                      origin=lender if isinstance(lender, str) else None,
                                      worker=record.get("worker") is True)
                restored.append(tile)
        return restored
