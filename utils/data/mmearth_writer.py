"""Writes an MMEarth file set: ``<stem>.h5`` plus its band-stats, splits and tile-info JSON files.

The layout follows MMEarth-data ``utils/convert_to_h5.py`` (vishalned/MMEarth-data): every dataset of the
modality registry
(:data:`multimae.domains.MODALITIES`) with MMEarth's name, dtype and channel order, shape (N, C, S, S)
for pixel-level and (N, C) for image-level modalities, gzip compression and one chunk per sample
(``chunks=(1, ...)``), plus the ``metadata`` compound (``tile_id`` S100, ``S2_type`` S10).
Band statistics exclude every no-data value the registry lists (and NaN / inf), are kept per
Sentinel-2 product (``sentinel2_l1c``, ``sentinel2_l2a``; no plain ``sentinel2`` key) and are
accumulated while rows are written, so nothing is read back. Each row's chunk is compressed here (with
libdeflate when the ``deflate`` package is installed, else zlib) and stored with HDF5's direct chunk
write: the same zlib stream the gzip filter stores, read back by any HDF5 reader.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import zlib

import h5py
import numpy as np

from multimae.domains import MODALITIES, Modality
from utils.data.mmearth_files import S2_PRODUCTS, invalid_mask

__all__ = ["METADATA_DTYPE", "BandStats", "MMEarthWriter", "check_target", "make_splits"]

#: The ``metadata`` compound dtype of MMEarth files.
METADATA_DTYPE = np.dtype([("tile_id", "S100"), ("S2_type", "S10")])

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

try:
    import deflate as _libdeflate
except ImportError:  # optional speed-up
    _libdeflate = None


def _compress(buf: bytes, level: int) -> bytes:
    """``buf`` as a zlib stream (RFC 1950), what HDF5's gzip filter stores for a chunk at ``level``."""
    if _libdeflate is not None and 1 <= level <= 12:
        return _libdeflate.zlib_compress(buf, level)
    return zlib.compress(buf, level)


class BandStats:
    """Per-band count, mean, std, min and max of valid values, merged block by block.

    Uses the pairwise update of Chan et al. (1979) so that one pass over the rows gives the same
    figures as a two-pass computation in float64.

    Args:
        num_bands: Number of channels C.
    """

    def __init__(self, num_bands: int) -> None:
        self.count = np.zeros(num_bands, np.int64)
        self.mean = np.zeros(num_bands)
        self.m2 = np.zeros(num_bands)
        self.min = np.full(num_bands, np.inf)
        self.max = np.full(num_bands, -np.inf)

    def update(self, x: np.ndarray, invalid: np.ndarray) -> None:
        """Add a block: ``x`` and ``invalid`` of shape (n, C, ...); invalid values are skipped."""
        c = x.shape[1]
        v = np.moveaxis(x, 1, 0).reshape(c, -1).astype(np.float64)
        ok = ~np.moveaxis(invalid, 1, 0).reshape(c, -1)
        n = ok.sum(1)
        if not n.any():
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(ok, v, 0).sum(1) / np.maximum(n, 1)
            m2 = np.where(ok, (v - mean[:, None]) ** 2, 0).sum(1)
        total = self.count + n
        delta = mean - self.mean
        frac = np.divide(n, total, out=np.zeros(c), where=total > 0)
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2 + delta**2 * self.count * frac
        self.count = total
        self.min = np.minimum(self.min, np.where(ok, v, np.inf).min(1))
        self.max = np.maximum(self.max, np.where(ok, v, -np.inf).max(1))

    def to_json(self) -> dict:
        """``{"mean", "std", "min", "max", "count"}`` lists. A band without any valid value gets mean 0,
        std 1, min 0, max 0 and count 0 (an identity normalisation: all its pixels are masked anyway)."""
        has = self.count > 0
        std = np.sqrt(np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=has))
        return {
            "mean": np.where(has, self.mean, 0.0).tolist(),
            "std": np.where(has, std, 1.0).tolist(),
            "min": np.where(has, self.min, 0.0).tolist(),
            "max": np.where(has, self.max, 0.0).tolist(),
            "count": self.count.tolist(),
        }


def _stats_key(modality: Modality, s2_type: str) -> str | None:
    if modality.stats_key == "sentinel2":
        return f"sentinel2_{s2_type}"
    return modality.stats_key


class _GuardedFile(io.RawIOBase):
    """A binary file for h5py's file-object driver that survives a full disk.

    HDF5 cannot close a file after a failed write (the process crashes at exit). This wrapper records
    the first "no space" / "quota exceeded" error and from then on pretends writes succeed, so the
    file still closes cleanly; the writer checks :attr:`error` and deletes the file.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._f = open(path, "w+b", buffering=0)  # noqa: SIM115 (closed in close())
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self._f.readinto(buf)

    def write(self, buf) -> int:
        if self.error is None:
            try:
                return self._f.write(buf)
            except OSError as err:
                if err.errno not in _NO_SPACE:
                    raise
                self.error = err
        return len(buf)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._f.truncate(size)
            except OSError as err:
                if err.errno not in _NO_SPACE:
                    raise
                self.error = err
        return self.tell() if size is None else size

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        """fsync the file (or record a full disk)."""
        if self.error is None:
            try:
                os.fsync(self._f.fileno())
            except OSError as err:
                if err.errno not in _NO_SPACE:
                    raise
                self.error = err

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        super().close()


def _fileset_names(stem: str) -> dict[str, str]:
    return {"h5": f"{stem}.h5", **{k: f"{stem}_{k}.json" for k in ("band_stats", "splits", "tile_info")}}


def check_target(folder: Path, overwrite: bool) -> list[Path]:
    """Check that a file set may be written to ``folder``; return leftovers of interrupted runs.

    Args:
        folder: The file-set folder (its name is the stem).
        overwrite: Whether an existing ``<stem>.h5`` or side file may be replaced.

    Returns:
        Hidden ``.<stem>.partial-*`` / ``.<stem>.old-*`` folders beside ``folder`` that an interrupted
        run left (an ``.old-*`` one may hold the previous file set).

    Raises:
        FileExistsError: ``folder`` is not a folder, or holds one of the four files and not ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if not overwrite:
        for name in _fileset_names(folder.name).values():
            if (folder / name).exists():
                raise FileExistsError(f"{folder / name} exists; pass --overwrite to replace the file set in {folder}")
    parent = folder.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir()
                  if p.name.startswith((f".{folder.name}.partial-", f".{folder.name}.old-")))


class MMEarthWriter:
    """Creates every MMEarth dataset for ``num_tiles`` rows and fills them block by block.

    The whole file set is written into a hidden folder beside ``folder`` (``.<stem>.partial-*``) and
    moved into place by :meth:`close` with directory renames, so readers see the previous file set or
    the new one, never a mix, and an interrupted run leaves the previous file set as it was. Other
    files in ``folder`` (e.g. ``LICENSE-data``) are kept. A full disk raises ``OSError`` (``ENOSPC``)
    naming the file after removing the partial file set.

    Args:
        folder: Output folder; the file stem is its basename (``data_1M_v001_64/data_1M_v001_64.h5``).
        num_tiles: Number of rows N.
        tile_size: Tile side S in pixels.
        overwrite: Replace an existing file set in ``folder``; without it an existing ``<stem>.h5`` or
            side file is an error (checked again just before the move).
        compression_level: gzip level (MMEarth uses h5py's default, 4).
        attrs: Extra HDF5 file attributes (provenance), plain strings or numbers.

    Raises:
        FileExistsError: see :func:`check_target`.
    """

    def __init__(
        self, folder: Path, num_tiles: int, tile_size: int, *, overwrite: bool = False, compression_level: int = 4,
        attrs: dict | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.stem = self.folder.name
        self.overwrite = overwrite
        self.num_tiles, self.tile_size = num_tiles, tile_size
        self.names = _fileset_names(self.stem)
        check_target(self.folder, overwrite)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.stem}.partial-", dir=self.folder.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the published folder gets the usual mode
        self.path = self.folder / self.names["h5"]
        self._file = _GuardedFile(self._tmp / self.names["h5"])
        self._h5 = h5py.File(self._file, "w")
        for key, value in (attrs or {}).items():
            self._h5.attrs[key] = value
        for mod in MODALITIES.values():
            shape = (len(mod.bands), tile_size, tile_size) if mod.level == "pixel" else (len(mod.bands),)
            fill = mod.fill_value
            self._h5.create_dataset(
                mod.name, shape=(num_tiles, *shape), dtype=mod.dtype, chunks=(1, *shape),
                compression="gzip", compression_opts=compression_level,
                fillvalue=np.array(0 if fill is None else fill).astype(mod.dtype),
            )
        self._h5.create_dataset(
            "metadata", shape=(num_tiles,), dtype=METADATA_DTYPE, chunks=(1,),
            compression="gzip", compression_opts=compression_level,
        )
        self.compression_level = compression_level
        self._dsets = {name: self._h5[name] for name in (*MODALITIES, "metadata")}
        # a missing modality repeats one fill-value row: compress it once
        self._fill_rows = {}
        for mod in MODALITIES.values():
            row = np.full(self._dsets[mod.name].shape[1:], 0 if mod.fill_value is None else mod.fill_value, mod.dtype)
            self._fill_rows[mod.name] = (row.tobytes(), _compress(row.tobytes(), compression_level))
        self.stats: dict[str, BandStats] = {}
        for mod in MODALITIES.values():
            if mod.kind != "continuous":
                continue
            for s2_type in S2_PRODUCTS if mod.stats_key == "sentinel2" else ("",):
                self.stats[_stats_key(mod, s2_type)] = BandStats(len(mod.bands))
        self.tile_info: dict[str, dict] = {}

    def _check_space(self) -> None:
        if self._file.error is not None:
            err = self._file.error
            raise OSError(err.errno, err.strerror, str(self._file.path))

    def write(self, start: int, data: dict[str, np.ndarray], tile_ids: list[str], s2_types: list[str],
              infos: list[dict]) -> None:
        """Write rows ``start .. start + n - 1``.

        Args:
            start: First row.
            data: Every modality name -> array (n, C, S, S) or (n, C) in the registry's dtype.
            tile_ids: n unique ASCII tile ids (at most 100 bytes).
            s2_types: n Sentinel-2 product levels, ``l1c`` or ``l2a``.
            infos: n tile-info entries (JSON-serialisable dicts), stored under the tile id.

        Raises:
            ValueError: a modality is missing or has the wrong shape or dtype, a tile id is too long
                or repeated, or ``s2_types`` holds an unknown product level.
            OSError: the disk is full (``errno.ENOSPC``; the file names the partial HDF5 file).
        """
        n = len(tile_ids)
        if start + n > self.num_tiles:
            raise ValueError(f"rows {start}..{start + n - 1} exceed the {self.num_tiles} rows of {self.path}")
        for mod in MODALITIES.values():
            if mod.name not in data:
                raise ValueError(f"tile block misses modality {mod.name!r}")
            x = data[mod.name]
            dset = self._dsets[mod.name]
            expected = dset.shape[1:]
            if x.shape != (n, *expected) or x.dtype != np.dtype(mod.dtype):
                raise ValueError(
                    f"modality {mod.name!r}: got {x.dtype}{x.shape}, MMEarth stores {mod.dtype}{(n, *expected)}"
                )
            fill_raw, fill_chunk = self._fill_rows[mod.name]
            zeros = (0,) * len(expected)
            for i in range(n):
                raw = np.ascontiguousarray(x[i]).tobytes()
                chunk = fill_chunk if raw == fill_raw else _compress(raw, self.compression_level)
                dset.id.write_direct_chunk((start + i, *zeros), chunk)
            if mod.kind == "continuous":
                self._update_stats(mod, x, s2_types)
        meta = np.zeros(n, METADATA_DTYPE)
        for i, (tile_id, s2_type, info) in enumerate(zip(tile_ids, s2_types, infos)):
            if s2_type not in S2_PRODUCTS:
                raise ValueError(f"tile {tile_id!r}: S2_type {s2_type!r} is not one of {S2_PRODUCTS}")
            if len(tile_id.encode()) > 100 or not tile_id.isascii():
                raise ValueError(f"tile id {tile_id!r} is not ASCII of at most 100 bytes (metadata S100)")
            if tile_id in self.tile_info:
                raise ValueError(f"tile id {tile_id!r} is repeated")
            meta[i] = (tile_id.encode(), s2_type.encode())
            self.tile_info[tile_id] = info
        self._dsets["metadata"][start:start + n] = meta
        self._check_space()

    def _update_stats(self, mod: Modality, x: np.ndarray, s2_types: list[str]) -> None:
        invalid = invalid_mask(mod, x)
        if mod.stats_key != "sentinel2":
            self.stats[mod.stats_key].update(x, invalid)
            return
        kinds = np.array(s2_types)
        for s2_type in S2_PRODUCTS:
            rows = kinds == s2_type
            if rows.any():
                self.stats[f"sentinel2_{s2_type}"].update(x[rows], invalid[rows])

    def close(self, splits: dict[str, list[int]]) -> dict[str, Path]:
        """Finish the HDF5 file, write the three JSON side files and move the file set into place.

        Args:
            splits: Split name -> HDF5 row indices.

        Returns:
            Paths keyed ``h5``, ``band_stats``, ``splits``, ``tile_info`` (in ``folder``).

        Raises:
            ValueError: fewer rows were written than announced.
            FileExistsError: without ``overwrite``, a file of the set appeared in ``folder`` meanwhile.
            OSError: the disk is full (``errno.ENOSPC``).
        Every error removes the partial file set and leaves ``folder`` as it was.
        """
        try:
            if len(self.tile_info) != self.num_tiles:
                raise ValueError(f"{self.path}: {len(self.tile_info)} rows written, {self.num_tiles} announced")
            self._h5.close()
            self._file.sync()
            self._file.close()
            self._check_space()
            for key, obj in (
                ("band_stats", {k: s.to_json() for k, s in self.stats.items()}),
                ("splits", splits),
                ("tile_info", self.tile_info),
            ):
                with open(self._tmp / self.names[key], "w") as f:
                    f.write(json.dumps(obj, indent=None if key == "tile_info" else 1, allow_nan=False))
                    f.flush()
                    os.fsync(f.fileno())
            self._publish()
        except BaseException:
            self.abort()
            raise
        return {key: self.folder / name for key, name in self.names.items()}

    def _publish(self) -> None:
        """Move the finished file set from the hidden folder into ``folder`` (see the class docstring)."""
        check_target(self.folder, self.overwrite)
        if not self.folder.exists():
            os.rename(self._tmp, self.folder)
            _fsync_dir(self.folder.parent)
            return
        shutil.copymode(self.folder, self._tmp)
        keep = [p for p in self.folder.iterdir() if p.name not in self.names.values()]
        moved: list[Path] = []
        try:
            for p in keep:  # other files travel into the new folder before the swap
                os.rename(p, self._tmp / p.name)
                moved.append(p)
        except OSError:
            for p in moved:
                os.rename(self._tmp / p.name, p)
            raise
        old = Path(tempfile.mkdtemp(prefix=f".{self.stem}.old-", dir=self.folder.parent))
        os.rename(self.folder, old / self.stem)
        try:
            os.rename(self._tmp, self.folder)
        except OSError:
            os.rename(old / self.stem, self.folder)
            for p in moved:
                os.rename(self._tmp / p.name, p)
            old.rmdir()
            raise
        _fsync_dir(self.folder.parent)
        shutil.rmtree(old)

    def abort(self) -> None:
        """Close and delete the partial file set (after an error); ``folder`` is left as it was."""
        try:
            if self._h5.id.valid:
                self._h5.close()
        except Exception:  # noqa: BLE001 - the file is deleted below; its close errors do not matter
            pass
        self._file.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_splits(
    groups: list, fractions: dict[str, float], seed: int = 0, exclude: set[int] | None = None
) -> dict[str, list[int]]:
    """Deterministic random splits of HDF5 rows, keeping rows of one group in one split.

    Groups (e.g. one location's L1C and L2A tiles, or one scene) are shuffled with ``seed`` and
    assigned by largest remainder of ``fraction * number of groups``; then every split with a
    positive fraction gets at least one group when there are enough groups, taken from the largest.

    Args:
        groups: Group key of each row (length N).
        fractions: Split name -> fraction (non-negative, summing to 1).
        seed: Seed of the shuffle.
        exclude: Rows left out of every split (e.g. tiles without any valid pixel).

    Returns:
        Split name -> sorted row indices; disjoint, covering all rows not excluded.
    """
    exclude = exclude or set()
    order: dict = {}
    for row, g in enumerate(groups):
        if row not in exclude:
            order.setdefault(g, []).append(row)
    keys = list(order)
    keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    names = list(fractions)
    raw = np.array([fractions[s] for s in names]) * len(keys)
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: len(keys) - counts.sum()]:
        counts[i] += 1
    for i, name in enumerate(names):
        if counts[i] == 0 and fractions[name] > 0 and (counts > 1).any():
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    out, pos = {}, 0
    for name, k in zip(names, counts):
        out[name] = sorted(row for g in keys[pos:pos + k] for row in order[g])
        pos += k
    return out
