"""Writes tiny GEO-Bench v1.0-format task folders for tests (format: data_formats.md section 2).

Each task folder holds ``default_partition.json`` and ``0.50x_train_partition.json`` (``train`` / ``valid`` /
``test`` sample names), ``band_stats.json`` (per band name: mean, std, min, max, ...) and one ``<sample>.hdf5``
per sample with one 2-D int16 dataset per band named by the band descriptor, a ``label`` dataset for
segmentation, and the attribute ``pickle`` = ``str(pickle.dumps(dict, protocol=4))`` holding ``bands_order``,
per band ``{"date", "date_id", "spatial_resolution", "band_info", "meta_info", "transform", "crs"}`` and, for
classification, ``label``. ``band_info`` objects are instances of classes named ``geobench.dataset.Sentinel2``
(pickled through a temporary stand-in module, so geobench need not be installed); ``transform`` is a real
``affine.Affine`` and ``crs`` a real ``rasterio.crs.CRS``, as in the v1.0 files.

Pixel values are synthetic: each band is filled with a band-specific constant plus noise, so tests can check
which band landed where (m-eurosat writes the *EuroSAT* file-order channels under GEO-Bench's positional
names, reproducing the documented shift). Class information is planted in the pixels (the class id shifts
the mean of every band, or only of the true bands named in ``signal_bands``) so a model can learn it. With
``class_names`` the folder also gets a ``task_specs.pkl`` (a pickled ``geobench.task.TaskSpecifications`` whose
``label_type`` is a ``geobench.label.Classification`` naming the classes), as the v1.0 folders hold.
"""

from __future__ import annotations

import datetime
import json
import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import affine
import h5py
import numpy as np
import rasterio.crs

__all__ = ["write_geobench_task", "write_malicious_sample", "BAND_VALUE", "GEOBENCH_S2_NAMES"]

# GEO-Bench's positional Sentinel-2 band descriptors (13 bands).
GEOBENCH_S2_NAMES = (
    "01 - Coastal aerosol", "02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge",
    "06 - Vegetation Red Edge", "07 - Vegetation Red Edge", "08 - NIR", "08A - Vegetation Red Edge",
    "09 - Water vapour", "10 - SWIR - Cirrus", "11 - SWIR", "12 - SWIR",
)
# True Sentinel-2 band behind each positional name, per task; m-eurosat follows EuroSAT's file order.
_TRUE_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_EUROSAT_TRUE = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
#: Constant (reflectance x 10000) each true band is filled with, before noise and the class offset.
BAND_VALUE = {b: 1000 + 100 * i for i, b in enumerate(_TRUE_BANDS)}

_SPECS = {
    "m-eurosat": ("classification_v1.0", "classification", 10, 16),
    "m-bigearthnet": ("classification_v1.0", "multilabel", 43, 16),
    "m-cashew-plant": ("segmentation_v1.0", "segmentation", 7, 16),
}


@contextmanager
def _fake_geobench():
    """Temporarily register ``geobench.dataset`` with band classes so pickle can name them."""
    pkg, mod = types.ModuleType("geobench"), types.ModuleType("geobench.dataset")
    for name in ("BandInfo", "SpectralBand", "Sentinel2", "Sentinel1", "CloudProbability"):
        cls = type(name, (), {"__module__": "geobench.dataset"})
        setattr(mod, name, cls)
    task, label = types.ModuleType("geobench.task"), types.ModuleType("geobench.label")
    task.TaskSpecifications = type("TaskSpecifications", (), {"__module__": "geobench.task"})
    for name in ("Classification", "MultiLabelClassification"):
        setattr(label, name, type(name, (), {"__module__": "geobench.label"}))
    pkg.dataset, pkg.task, pkg.label = mod, task, label
    saved = {k: sys.modules.get(k) for k in ("geobench", "geobench.dataset", "geobench.task", "geobench.label")}
    sys.modules.update({"geobench": pkg, "geobench.dataset": mod, "geobench.task": task, "geobench.label": label})
    try:
        yield mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _band_info(mod, cls_name: str, name: str, wavelength: float):
    obj = getattr(mod, cls_name)()
    obj.__dict__.update(name=name, alias=None, spatial_resolution=10, wavelength=wavelength)
    return obj


def write_geobench_task(root: Path, task: str, num_samples: int = 9, seed: int = 0,
                        signal_bands: tuple[str, ...] | None = None, class_names: list[str] | None = None) -> Path:
    """Write ``root/<benchmark>/<task>/`` with ``num_samples`` samples (split 5 / 2 / 2 when 9). Returns it.

    ``task`` is ``m-eurosat`` (10 classes, shifted band names), ``m-bigearthnet`` (43-class multi-hot numpy
    label) or ``m-cashew-plant`` (7-class ``label`` map, dated band names ``04 - Red_2019-12-10``).
    ``signal_bands``: the true Sentinel-2 bands (``B8A``, ``B11``) that carry the class offset (None: all).
    ``class_names``: write a ``task_specs.pkl`` naming the classes.
    """
    benchmark, kind, k, size = _SPECS[task]
    folder = Path(root) / benchmark / task
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    true = _EUROSAT_TRUE if task == "m-eurosat" else _TRUE_BANDS
    date = "_2019-12-10" if task == "m-cashew-plant" else ""
    names = [f"s{i:03d}" for i in range(num_samples)]
    values: dict[str, list[np.ndarray]] = {n: [] for n in GEOBENCH_S2_NAMES}
    with _fake_geobench() as mod:
        for i, sample in enumerate(names):
            if kind == "segmentation":
                label = np.repeat(np.repeat(rng.integers(0, k, (size // 4, size // 4)), 4, 0), 4, 1)
                offset = label * 150.0
            else:
                label = int(i % k) if kind == "classification" else (rng.random(k) < 0.15).astype(np.int64)
                cls_id = label if kind == "classification" else int(label.argmax())
                offset = np.full((size, size), cls_id * 150.0)
            info = {"bands_order": [n + date for n in GEOBENCH_S2_NAMES]}
            with h5py.File(folder / f"{sample}.hdf5", "w") as h5:
                for j, name in enumerate(GEOBENCH_S2_NAMES):
                    signal = offset if signal_bands is None or true[j] in signal_bands else 0.0
                    data = BAND_VALUE[true[j]] + signal + rng.normal(0, 20, (size, size))
                    data = np.rint(data).astype(np.int16)
                    h5.create_dataset(name + date, data=data)
                    values[name].append(data.astype(np.float64))
                    info[name + date] = {
                        "date": datetime.date(2019, 12, 10), "date_id": 0, "spatial_resolution": 10,
                        "band_info": _band_info(mod, "Sentinel2", name, 0.4 + 0.1 * j), "meta_info": None,
                        "transform": affine.Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0),
                        "crs": rasterio.crs.CRS.from_epsg(32633),
                    }
                if kind == "segmentation":
                    h5.create_dataset("label", data=label.astype(np.int16))
                else:
                    info["label"] = label
                h5.attrs["pickle"] = str(pickle.dumps(info, protocol=4))
        if class_names is not None:
            label_cls = "MultiLabelClassification" if kind == "multilabel" else "Classification"
            label_type = getattr(sys.modules["geobench.label"], label_cls)()
            # geobench.label: Classification keeps "_class_names", MultiLabelClassification "class_name"
            label_type.__dict__.update({"n_classes": k, "class_name" if kind == "multilabel" else "_class_names":
                                        list(class_names)})
            specs = sys.modules["geobench.task"].TaskSpecifications()
            specs.__dict__.update(dataset_name=task, benchmark_name=benchmark, patch_size=(size, size),
                                  n_time_steps=1, label_type=label_type, spatial_resolution=10)
            (folder / "task_specs.pkl").write_bytes(pickle.dumps(specs, protocol=4))
    stats = {n: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)),
                 "max": float(np.max(v)), "median": float(np.median(v))} for n, v in values.items()}
    (folder / "band_stats.json").write_text(json.dumps(stats))
    n_val = n_test = max(1, num_samples * 2 // 9)
    parts = {"train": names[:num_samples - n_val - n_test], "valid": names[-n_val - n_test:-n_test],
             "test": names[-n_test:]}
    (folder / "default_partition.json").write_text(json.dumps(parts))
    (folder / "0.50x_train_partition.json").write_text(json.dumps({**parts, "train": parts["train"][::2]}))
    return folder


class _Evil:
    """Pickles to a call of ``os.system`` (never executed by the restricted unpickler)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def write_malicious_sample(folder: Path, sample: str) -> Path:
    """Overwrite ``<folder>/<sample>.hdf5``'s ``pickle`` attribute with one that calls ``os.system``."""
    path = Path(folder) / f"{sample}.hdf5"
    with h5py.File(path, "a") as h5:
        h5.attrs["pickle"] = str(pickle.dumps({"label": 0, "x": _Evil()}, protocol=4))
    return path
