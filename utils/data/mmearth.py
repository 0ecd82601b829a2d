"""MMEarth HDF5 dataset: band groups by name, per-product Sentinel-2 stats, no-data masks.

Reads an MMEarth file set (``<stem>.h5``, ``<stem>_band_stats.json``, ``<stem>_splits.json``; format in
``../shared/reference/data_formats.md`` section 1) for the domains of :mod:`multimae.domains` and
returns samples in the batch contract of ``docs/DESIGN.md``. What it does differently from the
reference MultiMAE-EO loader (``upstream_multimae_eo.md`` section 19): the file is opened once per
worker process, each modality is read once per sample, Sentinel-2 is normalised with the stats of
the tile's product (``sentinel2_l1c`` / ``sentinel2_l2a`` from ``metadata`` S2_type, as MMEarth-train
does), no-data becomes a validity mask (continuous) or ``IGNORE_INDEX`` (categorical), and label
maps are cropped, never interpolated bilinearly.

Damaged rows: a row that cannot be read or inflated (a corrupt gzip chunk, an HDF5 read error) or that
holds a value outside its modality's ``physical_range`` (:mod:`multimae.domains`) is skipped: the sample
is replaced by a substitute row drawn from the split by a hash of (seed, epoch, row), so every worker
count gives the same batches, and a one-line warning names the file, dataset and row. The damaged rows
are counted in shared memory (``MMEarthDataset.skipped_rows``, visible to the main process); more than
``max_bad_rows`` of them stop the run with one error naming the file and rows. A fault of the whole
file (truncated, not HDF5) is one error naming the file.

Speed: one-chunk-per-sample gzip rows are read as raw chunks and inflated with libdeflate or zlib
(:class:`utils.data.h5rows.RowReader`), and :meth:`MMEarthDataset.__getitems__` (called by
``torch.utils.data.DataLoader`` for each batch) normalises the whole batch with vectorised numpy.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from multimae.domains import IGNORE_INDEX, Domain, Modality, get_domain, get_modality
from utils.data.h5rows import RowReader, splitmix64
from utils.data.mmearth_files import (
    S2_PRODUCTS, DataFileError, check_modality_dataset, invalid_mask, load_band_stats, load_splits,
    physical_range_violation, read_s2_products, resolve_fileset,
)
from utils.data.mmearth_metadata import MMEarthMetadata

__all__ = ["MMEarthDataset", "domain_record", "standardize_per_tile"]

_ELEVATION_NORMS = ("per_tile", "band_stats")
_REPORTED: set[tuple[str, str]] = set()  # (file, domain) already reported without any valid pixel
#: What a damaged chunk raises while it is read or inflated (zlib, h5py / HDF5 filter and read errors).
_READ_ERRORS = (zlib.error, OSError, RuntimeError, ValueError)
_SUBSTITUTE_SALT = np.uint64(0xD1B54A32D192ED03)
_MAX_DRAWS = 10_000  # substitute draws before giving up on a split whose rows are (nearly) all damaged


class _BadRow(Exception):
    """Internal: row ``row`` of dataset ``dataset`` is damaged (``reason``)."""

    def __init__(self, row: int, dataset: str, reason: str) -> None:
        super().__init__(reason)
        self.row, self.dataset, self.reason = row, dataset, reason


@dataclass
class _Plan:
    """How one domain is cut from its modality and normalised (built once at construction)."""

    domain: Domain
    modality: Modality
    idx: np.ndarray                      # band indices into the stored channels
    per_tile: bool = False               # elevation standardised per sample (reference)
    scale: np.ndarray | None = None      # float32 (P, C): 1 / std per product P (P = 2 for Sentinel-2)
    offset: np.ndarray | None = None     # float32 (P, C): -mean / std
    lut: np.ndarray | None = None        # categorical: stored value -> class id or IGNORE_INDEX
    stats_keys: tuple[str, ...] = ()


def standardize_per_tile(
    x: np.ndarray, valid: np.ndarray, low: float = 0.1, high: float = 0.9, min_std: float = 1.0
) -> np.ndarray:
    """Per-sample, per-channel standardisation on valid pixels trimmed to the [low, high) quantile range.

    The reference's ``standardize_depth`` (MultiMAE-EO, ``upstream_multimae_eo.md`` 4.4): sort the
    valid values, keep the central slice ``[int(low n), int(high n))``, then return
    ``(x - mean) / max(sqrt(var + 1e-6), min_std)`` with the kept values' mean and unbiased variance.

    The ``min_std`` floor (in the units of ``x``: 1 metre for elevation) is our addition: on a flat tile
    (water, ice sheet) the trimmed standard deviation is close to 0 and the reference's formula blows a
    few metres of relief up to values in the hundreds, which then dominate the summed loss.

    Args:
        x: float32 (B, C, H, W), e.g. elevation in metres.
        valid: bool (B, H, W).

    Returns:
        float32 (B, C, H, W); samples without a valid pixel are returned as zeros.
    """
    b, c = x.shape[:2]
    flat, vflat = x.reshape(b, c, -1), valid.reshape(b, -1)
    mean = np.zeros((b, c), np.float64)
    std = np.ones((b, c), np.float64)
    full = vflat.all(1)

    def trimmed(v: np.ndarray):  # v: (..., n) values; the central order statistics via a partial sort
        n = v.shape[-1]
        lo, hi = int(low * n), int(high * n)
        kept = np.partition(v, [lo, hi - 1], axis=-1)[..., lo:hi] if hi - lo >= 2 else v
        var = kept.var(-1, ddof=1, dtype=np.float64) if kept.shape[-1] > 1 else np.zeros(kept.shape[:-1])
        return kept.mean(-1, dtype=np.float64), np.maximum(np.sqrt(var + 1e-6), min_std)

    if full.any():
        mean[full], std[full] = trimmed(flat[full])
    for i in np.flatnonzero(~full):
        if vflat[i].any():
            mean[i], std[i] = trimmed(flat[i][:, vflat[i]])
    out = (x - mean[:, :, None, None].astype(np.float32)) / std[:, :, None, None].astype(np.float32)
    return out.astype(np.float32, copy=False)


def domain_record(name: str, *, per_tile: bool = False, stats: dict | None = None) -> dict:
    """The description of one domain that checkpoints store (an entry of :meth:`MMEarthDataset.domain_info`).

    Args:
        name: Domain name (an output-only domain is described with its source's modality).
        per_tile: A continuous domain standardised per tile (``data.elevation_norm`` ``per_tile``).
        stats: ``{stats key: {"mean": [...], "std": [...]}}`` per band of the domain, as used to z-score it.

    Returns:
        ``{"modality", "bands", "kind", "level", "units", "source", "normalization", "stats", "class_names",
        "class_values", "nodata"}``: ``normalization`` is ``band_stats``, ``per_tile``, ``class ids`` or ``raw``.
    """
    d = get_domain(name)
    mod = get_modality(get_domain(d.source).modality if d.source else d.modality)
    if mod.kind != "continuous":
        norm = "class ids" if mod.kind in ("categorical", "onehot") else "raw"
    else:
        norm = "per_tile" if per_tile else "band_stats"
    labels = mod.kind != "continuous"
    return {
        "modality": mod.name, "bands": list(d.bands), "kind": d.kind, "level": d.level, "units": mod.units,
        "source": d.source, "normalization": norm, "stats": dict(stats or {}),
        "class_names": list(d.class_names if d.kind == "categorical" else mod.class_names) if labels else [],
        "class_values": list(d.class_values if d.kind == "categorical" else mod.class_values) if labels else [],
        "nodata": [str(v) for v in mod.nodata],
    }


class MMEarthDataset(Dataset):
    """MMEarth HDF5 file set as a map-style dataset of multi-domain samples.

    Each sample is ``{"inputs": {domain: Tensor}, "valid": {domain: Tensor}, "index": int}``:
    continuous pixel domains are float32 (C, H, W), z-scored (elevation optionally per tile), invalid
    pixels 0; categorical domains are int64 (H, W) class ids 0..K-1 with ``IGNORE_INDEX`` (-1) for
    no-data; ``valid`` is bool (H, W) (image-level domains: (C,) vectors and a () mask). ``index`` is
    the HDF5 row. Output-only domains (``Domain.source`` set, e.g. ``s2_rgb_normpix``) are not in the
    sample; their source domain is loaded instead. With ``metadata``, the sample also holds ``"metadata":
    {field: float32 (2,)}`` (sin, cos) pairs, NaN where absent (:mod:`utils.data.mmearth_metadata`).

    Args:
        data_path: The ``<stem>.h5`` file or the folder holding it and its side files.
        domains: Domain names of :data:`multimae.domains.DOMAINS`, in the order wanted.
        split: Split name of ``<stem>_splits.json`` (``train``, ``val``, ``test``).
        input_size: Output side in px; None = the full tile.
        augment: True: random crop (or resize) and horizontal flip, shared by every domain of a
            sample; False: centre crop, no flip.
        hflip: Flip probability when ``augment``.
        resize: Resize the whole tile to ``input_size`` instead of cropping (continuous: bilinear,
            validity: a pixel stays valid only if every source pixel was; labels: nearest).
        elevation_norm: ``per_tile`` (the reference's trimmed per-sample standardisation of the
            ``aster`` elevation band) or ``band_stats`` (z-score with the ``aster`` stats).
        seed: Base seed. Crop and flip of a sample depend only on (seed, epoch, HDF5 row), so they
            do not change with worker count, batch composition or order (exact resume).
        indices: HDF5 rows to use instead of the split's list.
        batch_transform: Optional picklable ``fn(samples, seeds) -> samples`` applied to every batch in the
            loading process (a pretraining objective's worker-side masks); ``seeds`` is a uint64 array (B,) that
            depends only on (seed, epoch, HDF5 row). Settable as an attribute.
        rdcc_nbytes: HDF5 chunk-cache size per dataset (None = h5py's default); only the fallback
            read path uses it.
        metadata: Metadata fields to deliver (:data:`multimae.metadata.METADATA_FIELDS`, config key
            ``model.metadata``); a field the file set lacks is NaN for every sample, with one warning.
        max_bad_rows: Damaged rows (unreadable, or physically impossible values in a used band) that
            are skipped and replaced by substitutes; one more raises :class:`DataFileError` (config key
            ``data.max_bad_rows``; 0 = the first damaged row stops the run).

    Raises:
        FileNotFoundError: missing HDF5 or side file. KeyError: unknown domain / split, missing HDF5
        dataset or stats key (the message names the file and key and lists valid names).
        DataFileError: the HDF5 file cannot be opened or read (truncated, not HDF5); while sampling,
        more than ``max_bad_rows`` damaged rows (names the file and rows).
        ValueError: wrong dtype / shape, bad split rows, bad stats, bad arguments.
    """

    def __init__(
        self, data_path, domains: Sequence[str], split: str = "train", *, input_size: int | None = None,
        augment: bool = False, hflip: float = 0.5, resize: bool = False, elevation_norm: str = "per_tile",
        seed: int = 0, indices=None, rdcc_nbytes: int | None = None, batch_transform=None,
        metadata: Sequence[str] = (), max_bad_rows: int = 0,
    ) -> None:
        if isinstance(domains, str) or not domains:
            raise ValueError(f"domains must be a non-empty list of domain names, got {domains!r}")
        if elevation_norm not in _ELEVATION_NORMS:
            raise ValueError(f"elevation_norm must be one of {_ELEVATION_NORMS}, got {elevation_norm!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if max_bad_rows < 0:
            raise ValueError(f"max_bad_rows must be >= 0, got {max_bad_rows}")
        self.files = resolve_fileset(data_path)
        self.domains = list(dict.fromkeys(domains))
        self.augment, self.hflip, self.resize = bool(augment), float(hflip), bool(resize)
        self.elevation_norm, self.seed, self.split = elevation_norm, int(seed), split
        self._rdcc_nbytes = rdcc_nbytes
        self.batch_transform = batch_transform
        resolved = [get_domain(d) for d in self.domains]
        loaded = {d.source if d.is_output_only else d.name: None for d in resolved}
        self._loaded = [get_domain(name) for name in loaded]
        for d in self._loaded:
            if d.kind == "onehot" and d.level != "image":
                raise ValueError(f"domain {d.name!r}: one-hot modality {d.modality!r} must be image-level")
        self._modalities = {d.modality: get_modality(d.modality) for d in self._loaded}
        self._metadata = MMEarthMetadata(self.files, metadata) if metadata else None
        if self._metadata is not None:  # its HDF5 datasets are read per row with the others
            self._modalities.update(self._metadata.modalities)
        self._open_and_check(split, indices)
        self.input_size = self.tile_size if input_size is None else int(input_size)
        if self.input_size <= 0 or (self.tile_size and self.input_size > self.tile_size and not self.resize):
            raise ValueError(
                f"input_size {input_size} must be in [1, tile size {self.tile_size}] (or set resize=True); "
                f"file {self.files.h5}"
            )
        self._h5, self._readers, self._pid = None, None, None
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # visible to persistent workers
        self.max_bad_rows = int(max_bad_rows)
        # One flag per HDF5 row, set by whichever process finds the row damaged: shared, so the main
        # process sees the workers' findings and a flagged row is never read again.
        self._bad = torch.zeros(self.num_rows, dtype=torch.uint8).share_memory_()
        self._bad_view = None  # numpy view of _bad, made per process with the file handle
        self._bad_reasons: list[str] = []  # this process's findings, for the error message
        self._range_bands = self._bands_to_check()

    # ------------------------------------------------------------------ construction
    def _open_and_check(self, split: str, indices) -> None:
        try:
            self._read_file_info(split, indices)
        except (OSError, RuntimeError) as err:  # h5py: truncated / not HDF5 / unreadable metadata
            raise DataFileError(f"{self.files.h5}: cannot read the HDF5 file ({' '.join(str(err).split())})") from err

    def _read_file_info(self, split: str, indices) -> None:
        path = self.files.h5
        with h5py.File(path, "r") as h5:
            ref = "metadata" if "metadata" in h5 else next(iter(self._modalities))
            if ref not in h5:
                raise KeyError(f"{path}: dataset {ref!r} missing; datasets present: {', '.join(sorted(h5))}")
            self.num_rows = int(h5[ref].shape[0])
            tile = None
            for mod in self._modalities.values():
                tile = check_modality_dataset(h5, path, mod, self.num_rows, tile)
            self.tile_size = tile
            self._splits = load_splits(self.files.splits, self.num_rows)
            if indices is None:
                if split not in self._splits:
                    raise KeyError(
                        f"{self.files.splits}: unknown split {split!r}; valid splits: {', '.join(self._splits)}"
                    )
                rows = self._splits[split]
            else:
                rows = np.asarray(indices, dtype=np.int64).reshape(-1)
                if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
                    raise ValueError(f"{path}: indices must lie in [0, {self.num_rows})")
            self._rows = rows
            needs_s2 = any(m.stats_key == "sentinel2" for m in self._modalities.values())
            self._products = read_s2_products(h5, path, rows) if needs_s2 else np.zeros(self.num_rows, np.uint8)
        self._plans = self._build_plans(needs_s2)

    def _bands_to_check(self) -> dict[str, list[int]]:
        """Modality -> the band indices whose physical range is checked (those the domains use)."""
        used: dict[str, set[int]] = {}
        for plan in self._plans:
            if plan.modality.physical_range:
                used.setdefault(plan.modality.name, set()).update(plan.idx.tolist())
        return {name: sorted(bands) for name, bands in used.items()}

    def _build_plans(self, needs_s2: bool) -> list[_Plan]:
        plans, needed, used = [], {}, {}
        present = sorted({S2_PRODUCTS[p] for p in np.unique(self._products[self._rows])}) if needs_s2 else []
        for d in self._loaded:
            mod = self._modalities[d.modality]
            plan = _Plan(d, mod, np.asarray(d.band_indices, dtype=np.int64))
            if mod.kind == "continuous":
                plan.per_tile = (self.elevation_norm == "per_tile" and d.modality == "aster"
                                 and tuple(d.bands) == ("elevation",))
                if not plan.per_tile:
                    keys = [f"sentinel2_{p}" for p in present] if mod.stats_key == "sentinel2" else [mod.stats_key]
                    plan.stats_keys = tuple(keys)
                    for k in keys:
                        needed[k] = mod
                        used.setdefault(k, []).extend(plan.idx.tolist())
            elif mod.kind == "categorical":
                bits = np.dtype(mod.dtype).itemsize * 8
                if bits > 16:
                    raise ValueError(f"modality {mod.name!r}: categorical dtype {mod.dtype} wider than 16 bits")
                plan.lut = np.full(1 << bits, IGNORE_INDEX, dtype=np.int64)
                plan.lut[np.asarray(d.class_values)] = np.arange(len(d.class_values))  # the domain's class table
                plan.lut[np.asarray([int(v) for v in mod.nodata], dtype=np.int64)] = IGNORE_INDEX  # never a class
            plans.append(plan)
        stats = load_band_stats(self.files.band_stats, needed, used)
        self._stats = stats
        self._report_empty(plans, stats)
        for plan in plans:
            if not plan.stats_keys:
                continue
            rows = plan.stats_keys
            if plan.modality.stats_key == "sentinel2":  # row p = product code p; an absent product borrows a row
                rows = [f"sentinel2_{p}" if f"sentinel2_{p}" in rows else rows[0] for p in S2_PRODUCTS]
            std = np.stack([stats[k]["std"][plan.idx] for k in rows])
            mean = np.stack([stats[k]["mean"][plan.idx] for k in rows])
            plan.scale = (1.0 / std).astype(np.float32)
            plan.offset = (-mean / std).astype(np.float32)
        return plans

    def _report_empty(self, plans: list[_Plan], stats: dict) -> None:
        """Report once per process each domain whose bands have no valid pixel in the whole file set (band-stats
        ``count`` 0): it is all no-data, so the objectives' masked losses give it no loss."""
        for plan in plans:
            counts = [stats[k]["count"][plan.idx] for k in plan.stats_keys if "count" in stats[k]]
            key = (str(self.files.h5), plan.domain.name)
            if counts and len(counts) == len(plan.stats_keys) and not any(c.any() for c in counts) \
                    and key not in _REPORTED:
                _REPORTED.add(key)
                print(f"warning: domain {plan.domain.name!r} ({plan.modality.name} {', '.join(plan.domain.bands)}) has "
                      f"no valid pixel in the whole file set {self.files.h5} (band stats count 0 in "
                      f"{self.files.band_stats.name}): it is all no-data and contributes no loss", file=sys.stderr)

    # ------------------------------------------------------------------ public helpers
    @property
    def split_names(self) -> list[str]:
        """Split names of ``<stem>_splits.json``."""
        return list(self._splits)

    @property
    def rows(self) -> np.ndarray:
        """HDF5 row of each sample position (int64 (len,))."""
        return self._rows

    @property
    def rows_digest(self) -> str:
        """SHA-256 (hex) of the split's HDF5 rows in order: changes when the split changes."""
        return hashlib.sha256(np.ascontiguousarray(self._rows, dtype="<i8").tobytes()).hexdigest()

    @property
    def skipped_rows(self) -> int:
        """Distinct damaged rows found so far by this process and its DataLoader workers."""
        return int(self._bad.sum())

    @property
    def bad_rows(self) -> list[int]:
        """HDF5 rows found damaged so far (sorted)."""
        return np.flatnonzero(self._bad.numpy()).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (shared with worker processes, persistent or not)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        """Epoch whose augmentation draws are used."""
        return int(self._epoch[0])

    def domain_info(self) -> dict:
        """JSON-serialisable description of every requested domain, for checkpoints.

        Returns:
            ``{domain: {"modality", "bands", "kind", "level", "units", "source", "normalization",
            "stats": {stats key: {"mean": [...], "std": [...]}}, "class_names", "class_values"}}``;
            stats are per band of the domain (Sentinel-2: one entry per product present).
        """
        plans = {p.domain.name: p for p in self._plans}
        info = {}
        for name in self.domains:
            d = get_domain(name)
            plan = plans[d.source or d.name]
            stats = {k: {"mean": self._stats[k]["mean"][plan.idx].tolist(),
                         "std": self._stats[k]["std"][plan.idx].tolist()} for k in plan.stats_keys}
            info[name] = domain_record(name, per_tile=plan.per_tile, stats=stats)
        return info

    # ------------------------------------------------------------------ worker-side file handle
    def _reader(self, modality: str) -> RowReader:
        if self._readers is None or self._pid != os.getpid():
            # First use in this process (or a forked worker inherited the parent's handle): reopen.
            kw = {} if self._rdcc_nbytes is None else {"rdcc_nbytes": int(self._rdcc_nbytes)}
            try:
                self._h5 = h5py.File(self.files.h5, "r", **kw)
                self._readers = {m: RowReader(self._h5[m]) for m in self._modalities}
            except (OSError, RuntimeError, KeyError) as err:
                raise DataFileError(f"{self.files.h5}: cannot reopen the HDF5 file "
                                    f"({' '.join(str(err).split())})") from err
            self._pid = os.getpid()
            self._bad_reasons = []
            self._bad_view = self._bad.numpy()  # this process's view of the shared flags
        return self._readers[modality]

    def close(self) -> None:
        """Close this process's HDF5 handle (reopened on the next read)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._readers, self._pid = None, None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_h5=None, _readers=None, _pid=None, _bad_reasons=[], _bad_view=None)
        return state

    # ------------------------------------------------------------------ sampling
    def __len__(self) -> int:
        return len(self._rows)

    def _geometry(self, rows: np.ndarray):
        """Crop corner (y0, x0) and flip flag per row, a pure function of (seed, epoch, row)."""
        n, size, tile = len(rows), self.input_size, self.tile_size
        span = 0 if self.resize else tile - size
        if not self.augment:
            off = np.full(n, span // 2, np.int64)
            return off, off, np.zeros(n, bool)
        key = splitmix64(splitmix64(np.uint64(self.seed & (2**64 - 1))) ^ np.uint64(self.epoch))
        h1 = splitmix64(key ^ rows.astype(np.uint64))
        h2, h3 = splitmix64(h1), splitmix64(h1 ^ np.uint64(0x5851F42D4C957F2D))
        y0 = (h1 >> np.uint64(11)) % np.uint64(span + 1)
        x0 = (h2 >> np.uint64(11)) % np.uint64(span + 1)
        flip = (h3 >> np.uint64(11)).astype(np.float64) * 2.0**-53 < self.hflip
        return y0.astype(np.int64), x0.astype(np.int64), flip

    def _read_row(self, row: int) -> dict[str, np.ndarray]:
        """Every loaded modality's full stored row; raises ``_BadRow`` for a damaged one."""
        tiles, readers = {}, self._readers
        for name, mod in self._modalities.items():
            reader = readers[name]
            try:
                tile = reader.read(row)
            except _READ_ERRORS as err:
                cls = type(err)
                kind = cls.__name__ if isinstance(err, OSError) else f"{cls.__module__}.{cls.__name__}"
                raise _BadRow(row, name, f"{kind}: {' '.join(str(err).split())}") from None
            bands = self._range_bands.get(name)
            why = physical_range_violation(mod, tile, bands) if bands else None
            if why:
                raise _BadRow(row, name, why)
            tiles[name] = tile
        return tiles

    def _substitute(self, row: int, draw: int) -> int:
        """The ``draw``-th substitute for ``row``: a split row, a pure function of (seed, epoch, row, draw)."""
        with np.errstate(over="ignore"):
            key = splitmix64(splitmix64(np.uint64(self.seed & (2**64 - 1))) ^ np.uint64(self.epoch))
            h = splitmix64(key ^ splitmix64(np.uint64(row) + np.uint64(draw) * _SUBSTITUTE_SALT))
        return int(self._rows[int(h % np.uint64(len(self._rows)))])

    def _good_row(self, row: int) -> tuple[int, dict[str, np.ndarray]]:
        """``(row, its tiles)``, or the first undamaged substitute's when ``row`` is damaged."""
        candidate, found = row, []
        for draw in range(1, _MAX_DRAWS + 1):
            if not self._bad_view[candidate]:
                try:
                    tiles = self._read_row(candidate)
                except _BadRow as bad:
                    self._record_bad(bad)
                    found.append(bad)
                else:
                    for bad in found:
                        print(f"warning: {self.files.h5}: skipped row {bad.row} (dataset {bad.dataset!r}: "
                              f"{bad.reason}); sample replaced by row {candidate}; {self.skipped_rows} damaged "
                              f"rows so far (data.max_bad_rows={self.max_bad_rows})", file=sys.stderr)
                    return candidate, tiles
            candidate = self._substitute(row, draw)
        raise DataFileError(f"{self.files.h5}: no undamaged row of split {self.split!r} found in {_MAX_DRAWS} "
                            f"draws ({self.skipped_rows} damaged rows: {self._bad_summary()})")

    def _record_bad(self, bad: _BadRow) -> None:
        """Flag a damaged row (shared with every process); past ``max_bad_rows``, stop."""
        self._bad_view[bad.row] = 1
        self._bad_reasons = (self._bad_reasons + [f"row {bad.row} ({bad.dataset}: {bad.reason})"])[-3:]
        count = self.skipped_rows
        if count > self.max_bad_rows:
            raise DataFileError(f"{self.files.h5}: {count} damaged rows, more than data.max_bad_rows="
                                f"{self.max_bad_rows}: {self._bad_summary()}")

    def _bad_summary(self) -> str:
        rows = self.bad_rows
        shown = ", ".join(map(str, rows[:20])) + (f", ... ({len(rows)} in all)" if len(rows) > 20 else "")
        return f"rows {shown}; last found here: {'; '.join(self._bad_reasons)}"

    def _read_batch(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Read each modality once per row; crop and flip pixel modalities.

        Returns:
            The rows actually read (damaged ones replaced by their substitutes) and, per modality, the
            batch as (B, C, h, w) / (B, C) stored values.
        """
        rows = np.array(rows, dtype=np.int64)  # a copy: substitutes replace damaged rows
        y0, x0, flip = self._geometry(rows)
        h = self.tile_size if self.resize else self.input_size
        out = {}
        for name, mod in self._modalities.items():
            reader = self._reader(name)
            shape = (len(rows), *reader.row_shape) if mod.level == "image" else (len(rows), len(mod.bands), h, h)
            out[name] = np.empty(shape, dtype=reader.dtype)
        for b, r in enumerate(rows):
            row, tiles = self._good_row(int(r))
            if row != r:  # the substitute's own crop and flip: a function of its row, as everywhere
                rows[b] = row
                y0[b], x0[b], flip[b] = (a[0] for a in self._geometry(rows[b:b + 1]))
            for name, mod in self._modalities.items():
                tile = tiles[name]
                if mod.level == "image":
                    out[name][b] = tile
                    continue
                tile = tile[:, y0[b]:y0[b] + h, x0[b]:x0[b] + h]
                out[name][b] = tile[..., ::-1] if flip[b] else tile
        return rows, out

    def __getitems__(self, positions) -> list[dict]:
        """Load a batch of samples (``DataLoader`` calls this once per batch); see the class docstring."""
        rows, raw = self._read_batch(self._rows[np.asarray(positions, dtype=np.int64)])
        products = self._products[rows].astype(np.int64)
        inputs, valid = {}, {}
        for plan in self._plans:
            x, v = self._process(plan, raw[plan.modality.name], products)
            if self.resize and plan.domain.level == "pixel" and x.shape[-1] != self.input_size:
                x, v = self._resize(plan, x, v)
            inputs[plan.domain.name], valid[plan.domain.name] = torch.from_numpy(x), torch.from_numpy(v)
        samples = [
            {"inputs": {k: t[b] for k, t in inputs.items()}, "valid": {k: t[b] for k, t in valid.items()},
             "index": int(rows[b])}
            for b in range(len(rows))
        ]
        if self._metadata is not None:
            meta = {k: torch.from_numpy(v) for k, v in self._metadata.batch(raw, rows).items()}
            for b, sample in enumerate(samples):
                sample["metadata"] = {k: t[b] for k, t in meta.items()}
        if self.batch_transform is not None:
            samples = self.batch_transform(samples, self.sample_seeds(rows))
        return samples

    def sample_seeds(self, rows: np.ndarray) -> np.ndarray:
        """uint64 (B,) seeds for per-sample draws outside the augmentation (a function of seed, epoch, row)."""
        key = splitmix64(splitmix64(np.uint64(self.seed & (2**64 - 1))) ^ np.uint64(self.epoch))
        return splitmix64(splitmix64(key ^ np.asarray(rows).astype(np.uint64)) ^ np.uint64(0x9E3779B97F4A7C15))

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]

    def _process(self, plan: _Plan, raw: np.ndarray, products: np.ndarray):
        """Normalise one domain of a batch. ``raw``: (B, C_mod, h, w) or (B, C_mod) stored values."""
        mod = plan.modality
        if mod.kind == "onehot":
            valid = raw.any(1)
            return np.where(valid, raw.argmax(1), IGNORE_INDEX).astype(np.int64), valid
        sub = raw[:, plan.idx]
        if mod.kind == "categorical":
            labels = plan.lut[sub[:, 0].view(f"u{sub.dtype.itemsize}")]
            return labels, labels != IGNORE_INDEX
        valid = ~invalid_mask(mod, sub).any(1)
        if mod.kind == "flags":
            return np.where(valid, sub[:, 0], 0).astype(np.int64), valid
        if plan.per_tile:
            x = sub.astype(np.float32)
            x = standardize_per_tile(x, valid) if x.ndim == 4 else x
        else:
            bshape = (-1, sub.shape[1]) + (1,) * (sub.ndim - 2)
            p = products if plan.scale.shape[0] > 1 else np.zeros_like(products)
            x = np.multiply(sub, plan.scale[p].reshape(bshape), dtype=np.float32)  # one pass, float32
            x += plan.offset[p].reshape(bshape)
        if sub.dtype.kind == "f":  # integer sources with validated stats cannot overflow float32
            valid &= np.isfinite(x).all(1)
        np.copyto(x, 0.0, where=~valid[:, None])
        return x, valid

    def _resize(self, plan: _Plan, x: np.ndarray, valid: np.ndarray):
        """Resize a (B, C, S, S) batch to ``input_size``: bilinear for continuous values, nearest for labels."""
        size, tile = self.input_size, x.shape[-1]
        if x.ndim == 3:  # class maps (B, S, S): nearest, pixel centres aligned
            idx = np.minimum(((np.arange(size) + 0.5) * tile / size).astype(np.int64), tile - 1)
            lab = x[:, idx][:, :, idx]
            return lab, lab != IGNORE_INDEX
        xt = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
        vt = F.interpolate(torch.from_numpy(valid[:, None].astype(np.float32)), size=(size, size),
                           mode="bilinear", align_corners=False)[:, 0] > 1 - 1e-4
        out = xt.numpy() * vt.numpy()[:, None]
        return out.astype(np.float32), vt.numpy()
