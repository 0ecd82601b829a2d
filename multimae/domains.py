"""The modality registry: every MMEarth modality and the model's domains, in one place.

A *modality* is one dataset of an MMEarth HDF5 file (``sentinel2``, ``aster``, ``esa_worldcover``,
...), described as MMEarth stores it: band names in stored order, dtype, units, pixel- or
image-level, no-data values and, for categorical maps, the class table.

A *domain* is what the model sees as one input or output: a named group of bands of one modality,
chosen by band name (``s2_rgb`` = Sentinel-2 B04, B03, B02). Each input domain gets its own patch
adapter in the encoder; what an objective does with a domain (its reconstruction loss, a per-patch
normalised target, ...) is the objective's setting, not the registry's. To change a modality or add a
domain, edit the two tables below; nothing else in the code base hard-codes band indices.

Sources: MMEarth-data ``utils/convert_to_h5.py`` (stored order, dtypes, no-data as written),
MMEarth-train ``MODALITIES.py`` / ``mmearth_dataset.py`` (no-data as read), and the reference
MultiMAE-EO ``domain_config.py`` (band groups of the default pretraining recipe). Where the
sources disagree on no-data (see ``data_formats.md`` section 1.8) every documented value is
treated as invalid.

This module is pure Python: no file IO, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "IGNORE_INDEX",
    "Modality",
    "Domain",
    "MODALITIES",
    "DOMAINS",
    "get_modality",
    "get_domain",
    "canonical_band_name",
    "band_indices",
]

#: Class id given to categorical no-data pixels; losses and metrics ignore it.
IGNORE_INDEX = -1

ModalityKind = Literal["continuous", "categorical", "onehot", "flags"]
Level = Literal["pixel", "image"]

_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B08", "B09", "B10", "B11", "B12")


@dataclass(frozen=True)
class Modality:
    """One MMEarth HDF5 dataset, as stored.

    Attributes:
        name: HDF5 dataset name, as MMEarth spells it.
        bands: Band (channel) names in stored order. Sentinel-2 uses canonical names (``B01``,
            ``B8A``); MMEarth's own spelling (``B1``, ``B8``) is accepted on lookup.
        dtype: numpy dtype of the stored array.
        units: Physical units of the stored values, per band group.
        level: ``"pixel"`` for (N, C, S, S) maps, ``"image"`` for (N, C) vectors.
        kind: ``continuous`` (z-scored with band stats), ``categorical`` (a class map remapped to
            0-based ids), ``onehot`` (an image-level one-hot vector), ``flags`` (a QA bit mask,
            returned raw).
        nodata: Stored values that mean "no data". NaN and +-inf are always invalid for float data.
        stats_key: Key of the band-stats JSON for continuous data. ``"sentinel2"`` means one of
            ``sentinel2_l1c`` / ``sentinel2_l2a``, chosen per tile from ``metadata`` S2_type.
        class_values: For categorical maps: the stored codes of the valid classes; the code at
            position i becomes class id i. Every other stored value becomes ``IGNORE_INDEX``.
        class_names: Human-readable class names, aligned with ``class_values``.
        class_colors: RGB hex colours for plots, aligned with ``class_values``.
        notes: Documented quirks.
        fill: The value a writer stores where the data is missing; ``None`` means the first ``nodata``
            value. MMEarth-data writes 255 for SCL and WorldCover.
        valid_min: Smallest valid stored value; anything below it is no-data too (``None``: no bound).
        physical_range: Per band, the inclusive (low, high) range a real measurement can take, in the
            stored units; empty: no bound beyond the dtype's. A value that is not no-data but lies outside
            it cannot come from the sensor (a damaged or mis-written row), so readers skip the whole row
            instead of training on it. The bounds are deliberately wide: a rare but real extreme must
            never trip them.
    """

    name: str
    bands: tuple[str, ...]
    dtype: str
    units: str
    level: Level
    kind: ModalityKind
    nodata: tuple[float, ...] = ()
    stats_key: str | None = None
    class_values: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()
    notes: str = ""
    fill: float | None = None
    valid_min: float | None = None
    physical_range: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.physical_range and len(self.physical_range) != len(self.bands):
            raise ValueError(f"modality {self.name!r}: physical_range has {len(self.physical_range)} entries, "
                             f"{len(self.bands)} bands")

    @property
    def fill_value(self) -> float | None:
        """Value written for missing data: ``fill``, else the first ``nodata`` value, else ``None``."""
        if self.fill is not None:
            return self.fill
        return self.nodata[0] if self.nodata else None

    @property
    def num_classes(self) -> int:
        """Number of valid classes (categorical / onehot), 0 otherwise."""
        return len(self.class_names)


_WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
_WORLDCOVER_NAMES = (
    "tree cover", "shrubland", "grassland", "cropland", "built-up", "bare / sparse vegetation",
    "snow and ice", "permanent water bodies", "herbaceous wetland", "mangroves", "moss and lichen",
)
# ESA WorldCover 2020 legend colours.
_WORLDCOVER_COLORS = (
    "#006400", "#ffbb22", "#ffff4c", "#f096ff", "#fa0000", "#b4b4b4",
    "#f0f0f0", "#0064c8", "#0096a0", "#00cf75", "#fae6a0",
)
_DW_NAMES = (
    "water", "trees", "grass", "flooded vegetation", "crops", "shrub and scrub", "built",
    "bare", "snow and ice",
)
# Dynamic World legend colours.
_DW_COLORS = (
    "#419bdf", "#397d49", "#88b053", "#7a87c6", "#e49635", "#dfc35a", "#c4281b", "#a59b8f", "#b39fe1",
)
_SCL_NAMES = (
    "saturated or defective", "dark area pixels", "cloud shadows", "vegetation", "not vegetated",
    "water", "unclassified", "cloud medium probability", "cloud high probability", "thin cirrus",
    "snow",
)
_SCL_COLORS = (
    "#ff0000", "#2f2f2f", "#643200", "#00a000", "#ffe65a", "#0000ff", "#808080", "#c0c0c0",
    "#ffffff", "#64c8ff", "#ff96ff",
)
_BIOME_NAMES = (
    "Tundra", "Tropical & Subtropical Moist Broadleaf Forests", "Mediterranean Forests, Woodlands & Scrub",
    "Deserts & Xeric Shrublands", "Temperate Grasslands, Savannas & Shrublands", "Boreal Forests/Taiga",
    "Temperate Conifer Forests", "Temperate Broadleaf & Mixed Forests", "Montane Grasslands & Shrublands",
    "Mangroves", "Flooded Grasslands & Savannas", "Tropical & Subtropical Grasslands, Savannas & Shrublands",
    "Tropical & Subtropical Dry Broadleaf Forests", "Tropical & Subtropical Coniferous Forests",
)
_ERA5_VARS = ("temperature_2m_mean", "temperature_2m_min", "temperature_2m_max", "total_precipitation")

# Physical ranges (Modality.physical_range), wide on purpose: only values no sensor or model can produce.
# Sentinel-1 sigma0 in dB: +60 dB is a backscatter coefficient of 10^6 (ships and corner reflectors reach
# about +30 dB); -100 dB is 10^-10, some 75 dB under the instrument's noise floor (about -25 dB).
_S1_DB_RANGE = (-100.0, 60.0)
# ASTER: elevation in metres from below the Dead Sea shore (-430 m) to above Everest (8849 m); slope in degrees.
_ASTER_RANGE = ((-500.0, 9000.0), (0.0, 90.0))
# ERA5 2 m temperatures in kelvin (records: 184 K, 330 K); precipitation in metres per month or year (the
# wettest places get about 12 m a year; ERA5 holds tiny negative rounding residues, hence -1 mm).
_ERA5_RANGE = ((150.0, 350.0),) * 3 + ((-1e-3, 30.0),)
_UNIT_CIRCLE = ((-1.0, 1.0), (-1.0, 1.0))  # sin / cos encodings

MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality(
            "sentinel2", _S2_BANDS, "uint16", "reflectance x 10000", "pixel", "continuous",
            nodata=(0,), stats_key="sentinel2",
            notes="MMEarth order puts B8A before B08. L2A tiles hold B10 = 0 (not in the L2A product).",
        ),
        Modality("sentinel2_cloudmask", ("QA60",), "uint16", "QA60 bit mask", "pixel", "flags", nodata=(65535,)),
        Modality(
            "sentinel2_cloudprod", ("MSK_CLDPRB",), "uint16", "cloud probability (%)", "pixel", "continuous",
            nodata=(65535,), stats_key="sentinel2_cloudprod", notes="L2A only; 65535 on L1C tiles.",
            physical_range=((0.0, 100.0),),
        ),
        Modality(
            "sentinel2_scl", ("SCL",), "uint8", "scene classification class", "pixel", "categorical",
            nodata=(0, 255), class_values=tuple(range(1, 12)), class_names=_SCL_NAMES, class_colors=_SCL_COLORS,
            fill=255, notes="L2A only; 255 on L1C tiles; SCL 0 is 'no data'.",
        ),
        Modality(
            "sentinel1",
            ("asc_VV", "asc_VH", "asc_HH", "asc_HV", "desc_VV", "desc_VH", "desc_HH", "desc_HV"),
            "float32", "backscatter (dB)", "pixel", "continuous", nodata=(float("-inf"),), stats_key="sentinel1",
            notes="-inf for a missing orbit or polarisation; HH/HV are mostly missing.",
            physical_range=(_S1_DB_RANGE,) * 8,
        ),
        Modality(
            "aster", ("elevation", "slope"), "int16", "elevation (metres), slope (degrees)", "pixel", "continuous",
            nodata=(-32768,), stats_key="aster", physical_range=_ASTER_RANGE,
            notes="The writer declares -inf, which int16 cannot hold; -32768 (the int16 DEM fill) is treated as "
            "no-data instead.",
        ),
        Modality(
            "era5",
            tuple(f"{period}_{var}" for period in ("prev_month", "curr_month", "year") for var in _ERA5_VARS),
            "float32", "temperature (K), precipitation (m)", "image", "continuous",
            nodata=(float("nan"), float("inf"), float("-inf")), stats_key="era5", physical_range=_ERA5_RANGE * 3,
        ),
        Modality(
            "dynamic_world", ("label",), "uint8", "Dynamic World class (stored 1..9)", "pixel", "categorical",
            nodata=(0,), class_values=tuple(range(1, 10)), class_names=_DW_NAMES, class_colors=_DW_COLORS,
        ),
        Modality(
            "canopy_height_eth", ("height", "std"), "int8", "canopy height and its std (metres)", "pixel",
            "continuous", nodata=(-128, -1), valid_min=0, stats_key="canopy_height_eth",
            notes="The writer's placeholder 255 cannot be stored in int8; negative values are treated as no-data.",
        ),
        Modality(
            "esa_worldcover", ("Map",), "uint8", "ESA WorldCover code", "pixel", "categorical",
            nodata=(0, 255), fill=255, class_values=_WORLDCOVER_CODES, class_names=_WORLDCOVER_NAMES,
            class_colors=_WORLDCOVER_COLORS, notes="MMEarth-data writes 255 for no-data, MMEarth-train reads 0.",
        ),
        Modality("lat", ("sin_lat", "cos_lat"), "float32", "sin/cos of latitude", "image", "continuous",
                 stats_key="lat", physical_range=_UNIT_CIRCLE),
        Modality("lon", ("sin_lon", "cos_lon"), "float32", "sin/cos of longitude", "image", "continuous",
                 stats_key="lon", physical_range=_UNIT_CIRCLE),
        Modality(
            "month", ("sin_month", "cos_month"), "float32", "sin/cos of 2*pi*month/12", "image", "continuous",
            stats_key="month", physical_range=_UNIT_CIRCLE,
        ),
        Modality(
            "biome", tuple(f"biome_{i}" for i in range(14)), "uint8", "one-hot biome", "image", "onehot",
            class_values=tuple(range(14)), class_names=_BIOME_NAMES, notes="An all-zero row is no-data.",
        ),
        Modality(
            "eco_region", tuple(f"eco_region_{i}" for i in range(846)), "uint16", "one-hot RESOLVE eco-region",
            "image", "onehot", class_values=tuple(range(846)),
            class_names=tuple(f"eco_region_{i}" for i in range(846)), notes="An all-zero row is no-data.",
        ),
    )
}


def _valid_list(names) -> str:
    return ", ".join(sorted(names))


def get_modality(name: str) -> Modality:
    """Return the registry entry of an MMEarth modality.

    Raises:
        KeyError: ``name`` is not an MMEarth modality; the message lists the valid ones.
    """
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; valid modalities: {_valid_list(MODALITIES)}") from None


def get_domain(name: str) -> Domain:
    """Return the registry entry of a domain.

    Raises:
        KeyError: ``name`` is not a registered domain; the message lists the valid ones.
    """
    try:
        return DOMAINS[name]
    except KeyError:
        raise KeyError(f"unknown domain {name!r}; valid domains: {_valid_list(DOMAINS)}") from None


_S2_ALIAS = re.compile(r"^B0?(\d{1,2}|8A)$", re.IGNORECASE)


def canonical_band_name(modality: str, band: str) -> str:
    """Canonical spelling of a band name: Sentinel-2 ``B1`` / ``b01`` -> ``B01``, ``B8a`` -> ``B8A``.

    Other modalities' band names are returned unchanged.
    """
    if modality == "sentinel2":
        m = _S2_ALIAS.match(band.strip())
        if m:
            num = m.group(1).upper()
            return "B8A" if num == "8A" else f"B{int(num):02d}"
    return band


def band_indices(modality: str, bands) -> list[int]:
    """Indices of ``bands`` (names) in the stored channel order of ``modality``.

    Raises:
        KeyError: unknown modality, or a band name absent from it; the message lists the valid bands.
    """
    mod = get_modality(modality)
    out = []
    for band in bands:
        canon = canonical_band_name(modality, band)
        if canon not in mod.bands:
            raise KeyError(
                f"unknown band {band!r} for modality {modality!r}; valid bands: {', '.join(mod.bands)}"
            )
        out.append(mod.bands.index(canon))
    return out


@dataclass(frozen=True)
class Domain:
    """A model input/output: a named band group of one modality.

    Attributes:
        name: Domain name used in configs, model keys and logs (``s2_rgb``, ``elevation``...).
        modality: Name of the MMEarth modality the bands come from.
        bands: Band names, in the order the model sees them.
        label_downsample: For categorical domains: the class map is majority-pooled by this factor
            before the model sees it (4 reproduces the reference's 14 x 14 land-cover map at 56 px
            input); the adapter then patches it with ``patch_size // label_downsample``.
        source: For output-only domains: the domain whose data, tokens and mask it reuses
            (``s2_rgb_normpix`` reconstructs ``s2_rgb``; the MultiMAE objective normalises its target per
            patch).
        description: One line for summaries.
        class_values: Categorical domains: stored codes of the classes, class id i = code at position
            i. Empty (the default) takes the modality's table; a domain may give its own (the
            reference's 12-class land cover). Resolved on construction, so it always holds the table
            in use.
        class_names: Names aligned with ``class_values`` (empty: the modality's).
        class_colors: RGB hex colours aligned with ``class_values`` (empty: the modality's).
    """

    name: str
    modality: str
    bands: tuple[str, ...]
    label_downsample: int = 1
    source: str | None = None
    description: str = ""
    class_values: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()
    _modality: Modality = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mod = get_modality(self.modality)
        object.__setattr__(self, "_modality", mod)
        band_indices(self.modality, self.bands)  # validates band names
        self._resolve_classes(mod)

    def _resolve_classes(self, mod: Modality) -> None:
        own = (self.class_values, self.class_names, self.class_colors)
        if not any(own):
            for attr in ("class_values", "class_names", "class_colors"):
                object.__setattr__(self, attr, getattr(mod, attr) if mod.kind == "categorical" else ())
            return
        if mod.kind != "categorical":
            raise ValueError(f"domain {self.name!r}: only categorical domains take a class table")
        if not (len(self.class_values) == len(self.class_names) == len(self.class_colors) > 0):
            raise ValueError(
                f"domain {self.name!r}: class_values, class_names and class_colors must have the same, non-zero "
                f"length; got {len(self.class_values)}, {len(self.class_names)}, {len(self.class_colors)}"
            )
        if len(set(self.class_values)) != len(self.class_values):
            raise ValueError(f"domain {self.name!r}: class_values lists a code twice: {self.class_values}")
        top = (1 << int(mod.dtype[len("uint"):])) - 1 if mod.dtype.startswith("uint") else None
        if any(not isinstance(v, int) or v < 0 or (top is not None and v > top) for v in self.class_values):
            raise ValueError(f"domain {self.name!r}: class_values must be codes storable as {mod.dtype}")

    @property
    def kind(self) -> ModalityKind:
        """``continuous`` or ``categorical`` (from the modality)."""
        return self._modality.kind

    @property
    def level(self) -> Level:
        """``pixel`` or ``image`` (from the modality)."""
        return self._modality.level

    @property
    def num_channels(self) -> int:
        """Channels the model receives: number of bands (continuous) or 1 (a class map)."""
        return len(self.bands)

    @property
    def num_classes(self) -> int:
        """Number of classes K (``class_values``) for categorical domains, 0 otherwise."""
        return len(self.class_values) if self.kind == "categorical" else 0

    @property
    def is_output_only(self) -> bool:
        """True for domains that only exist as decoder targets (``source`` is set)."""
        return self.source is not None

    @property
    def band_indices(self) -> list[int]:
        """Indices of ``bands`` in the modality's stored order."""
        return band_indices(self.modality, self.bands)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("s2_rgb", "sentinel2", ("B04", "B03", "B02"), description="Sentinel-2 red, green, blue (10 m)"),
        Domain("s2_rededge", "sentinel2", ("B05", "B06", "B07"), description="Sentinel-2 red edge (20 m)"),
        Domain("s2_nir", "sentinel2", ("B8A", "B08"), description="Sentinel-2 narrow and broad NIR"),
        Domain("s2_swir", "sentinel2", ("B11", "B12"), description="Sentinel-2 short-wave infrared (20 m)"),
        Domain("s2_atmos", "sentinel2", ("B01", "B09"), description="Sentinel-2 coastal aerosol, water vapour (60 m)"),
        Domain(
            "s2", "sentinel2",
            ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B08", "B09", "B11", "B12"),
            description="Sentinel-2, the 12 bands MMEarth trains on (no B10)",
        ),
        # OlmoEarth's Sentinel-2 L2A band sets (Herzog et al., allenai/olmoearth_pretrain data/constants.py), one
        # token per band set and patch; MMEarth stores every band on the 10 m grid.
        Domain("s2_10m", "sentinel2", ("B02", "B03", "B04", "B08"),
               description="Sentinel-2 10 m bands: blue, green, red, broad NIR (OlmoEarth band set)"),
        Domain("s2_20m", "sentinel2", ("B05", "B06", "B07", "B8A", "B11", "B12"),
               description="Sentinel-2 20 m bands: red edge, narrow NIR, SWIR (OlmoEarth band set)"),
        Domain("s2_60m", "sentinel2", ("B01", "B09"),
               description="Sentinel-2 60 m bands: coastal aerosol, water vapour (OlmoEarth band set)"),
        Domain(
            "s2_rgb_normpix", "sentinel2", ("B04", "B03", "B02"), source="s2_rgb",
            description="Sentinel-2 RGB with per-patch normalised targets (output only)",
        ),
        Domain("s1", "sentinel1", ("asc_VV", "asc_VH"), description="Sentinel-1 ascending VV, VH (dB)"),
        Domain("s1_desc", "sentinel1", ("desc_VV", "desc_VH"), description="Sentinel-1 descending VV, VH (dB)"),
        Domain("elevation", "aster", ("elevation",), description="ASTER GDEM elevation (m)"),
        Domain("slope", "aster", ("slope",), description="ASTER slope (degrees)"),
        Domain("canopy_height", "canopy_height_eth", ("height",), description="ETH canopy height (m)"),
        Domain(
            "worldcover", "esa_worldcover", ("Map",), label_downsample=4,
            description="ESA WorldCover, 11 classes, majority-pooled to 1/4 resolution",
        ),
        Domain(
            "dynamic_world", "dynamic_world", ("label",), label_downsample=4,
            description="Dynamic World, 9 classes, majority-pooled to 1/4 resolution",
        ),
        # The reference's land cover (its domain_config.py / dataset remap): codes 10..100 -> 0..10 in
        # this registry's order, no-data 255 -> class 11. Its weights (12-row class embedding, 12 logits)
        # load into this domain. 255 stays a no-data value of the modality, so this project's data
        # pipeline still masks those pixels (class 11 is never an input or a target); stored 0, which
        # the reference merges into tree cover, is no-data too.
        Domain(
            "worldcover12", "esa_worldcover", ("Map",), label_downsample=4,
            class_values=_WORLDCOVER_CODES + (255,), class_names=_WORLDCOVER_NAMES + ("no data (code 255)",),
            class_colors=_WORLDCOVER_COLORS + ("#000000",),
            description="ESA WorldCover in the MultiMAE-EO reference's 12 classes (11 + code 255 as class 11), "
            "majority-pooled to 1/4 resolution",
        ),
    )
}
