"""Converter guards (tile size, empty splits, all-no-data modalities) and never losing data: the file set
is written atomically, files are never replaced without --overwrite, and a full disk is one error line."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

from tools.geotiff_to_mmearth import convert, main
from utils.data import mmearth_writer
from utils.data.geotiff_spec import ConversionError

REPO = Path(__file__).resolve().parents[1]


def _tif(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32632", transform=from_origin(500_000, 6_000_000, 10, 10)) as ds:
        ds.write(data)


def _source(tmp_path: Path, scenes: dict[str, tuple[int, int]], s1: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """S2 (B04, B08) and optionally S1 (VV, VH) scenes of the given (height, width); returns (src, spec)."""
    rng = np.random.default_rng(seed)
    src = tmp_path / "src"
    sources = {"S2": {"modality": "sentinel2", "s2_type": "l1c", "bands": ["B04", "B08"]}}
    for name, (h, w) in scenes.items():
        _tif(src / "S2" / f"{name}.tif", rng.integers(100, 5000, (2, h, w)).astype(np.uint16))
        if s1:
            _tif(src / "S1" / f"{name}.tif", rng.normal(-15, 3, (2, h, w)).astype(np.float32))
    if s1:
        sources["S1"] = {"modality": "sentinel1", "bands": ["asc_VV", "asc_VH"]}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"sources": sources}, sort_keys=False))
    return src, spec


def _args(spec: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return ["--spec", str(spec), "--src", str(src), "--out", str(out), *extra]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _error_lines(stderr: str) -> list[str]:
    """stderr without the tqdm progress bar."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip() and not line.startswith("scenes")]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# ----------------------------------------------------------------------------- guards


def test_unsupported_tile_size_is_one_error_line(tmp_path, capsys):
    src, spec = _source(tmp_path, {"a": (200, 200)})
    assert main(_args(spec, src, tmp_path / "out", "--tile-size", "100")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --tile-size 100 is not supported")
    assert "--tile-size 64 or --tile-size 128" in err
    assert not (tmp_path / "out").exists()


def test_split_empty_by_scene_names_split_and_option(tmp_path, capsys):
    src, spec = _source(tmp_path, {"a": (128, 128)})
    assert main(_args(spec, src, tmp_path / "out", "--split-by", "scene")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: split 'val' would be empty: --split-by scene gives 1 scene group(s) for the 3 "
                          "splits with a positive fraction in --splits (train, val, test); use --split-by location")
    assert not (tmp_path / "out").exists()
    # the same scene split by location fills every split
    splits = "train=0.5,val=0.25,test=0.25"
    assert main(_args(spec, src, tmp_path / "out", "--split-by", "location", "--splits", splits)) == 0


def test_split_empty_after_dropping_no_data_tiles(tmp_path):
    src, spec = _source(tmp_path, {"a": (64, 192)}, s1=False)
    with rasterio.open(src / "S2" / "a.tif") as ds:
        x = ds.read()
    x[:, :, :64] = 0  # the first of three tiles holds no valid pixel
    _tif(src / "S2" / "a.tif", x)
    with pytest.raises(ConversionError, match=r"split 'test' would be empty: --split-by tile gives 2 tile group\(s\) "
                                              r"after leaving out 1 tile\(s\) without any valid pixel"):
        convert(spec, src, tmp_path / "out", split_by="tile", progress=False)
    assert not (tmp_path / "out").exists() and not _hidden(tmp_path / "out")


def test_all_no_data_modality_reported_once(tmp_path, capsys):
    src, spec = _source(tmp_path, {"a": (128, 128), "b": (128, 128)})
    for name in ("a", "b"):
        _tif(src / "S1" / f"{name}.tif", np.full((2, 128, 128), np.nan, np.float32))
        with rasterio.open(src / "S2" / f"{name}.tif") as ds:
            x = ds.read()
        x[1] = 0  # B08 never valid
        _tif(src / "S2" / f"{name}.tif", x)
    assert main(_args(spec, src, tmp_path / "out")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert err == ["warning: sentinel1 from sources.S1: no valid pixel in the whole file set",
                   "warning: sentinel2 (l1c) band(s) B08 from sources.S2: no valid pixel in the whole file set"]


# ----------------------------------------------------------------------------- never lose data


def test_lone_side_file_is_not_replaced_without_overwrite(tmp_path, capsys):
    src, spec = _source(tmp_path, {"a": (128, 128)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "out_splits.json").write_text('{"train": [0]}')
    assert main(_args(spec, src, out)) == 2
    assert capsys.readouterr().err.startswith(f"error: {out / 'out_splits.json'} exists; pass --overwrite")
    assert (out / "out_splits.json").read_text() == '{"train": [0]}' and sorted(os.listdir(out)) == ["out_splits.json"]
    assert not _hidden(out)


def test_overwrite_replaces_the_set_and_keeps_other_files(tmp_path):
    src, spec = _source(tmp_path, {"a": (128, 128)})
    out = tmp_path / "out"
    convert(spec, src, out, progress=False)
    (out / "LICENSE-data").write_text("CC BY 4.0")
    before = _digest(out)
    src2, spec2 = _source(tmp_path / "v2", {"a": (128, 128)}, seed=1)
    convert(spec2, src2, out, overwrite=True, progress=False)
    after = _digest(out)
    assert sorted(after) == ["LICENSE-data", "out.h5", "out_band_stats.json", "out_splits.json", "out_tile_info.json"]
    assert after["LICENSE-data"] == before["LICENSE-data"] and after["out.h5"] != before["out.h5"]
    assert not _hidden(out)
    with h5py.File(out / "out.h5") as f, rasterio.open(src2 / "S2" / "a.tif") as ds:
        np.testing.assert_array_equal(f["sentinel2"][0, 3], ds.read(1)[:64, :64])


@pytest.mark.parametrize("where", ["write", "close", "publish"])
def test_failure_leaves_the_previous_file_set_intact(tmp_path, monkeypatch, where):
    src, spec = _source(tmp_path, {"a": (128, 128), "b": (128, 128)})
    out = tmp_path / "out"
    convert(spec, src, out, progress=False)
    (out / "notes.txt").write_text("mine")
    before = _digest(out)
    if where == "write":
        calls = []
        real = mmearth_writer.MMEarthWriter.write

        def write(self, *a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt  # interrupted in the middle of the rows
            return real(self, *a, **kw)
        monkeypatch.setattr(mmearth_writer.MMEarthWriter, "write", write)
        error = KeyboardInterrupt
    elif where == "close":
        def dumps(*a, **k):  # a side file cannot be written
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(mmearth_writer.json, "dumps", dumps)
        error = OSError
    else:
        real_rename = os.rename

        def rename(a, b):  # the new folder cannot be moved into place: the old one must come back
            if Path(a).name.startswith(".out.partial-"):
                raise OSError(errno.EXDEV, "cross-device link")
            return real_rename(a, b)
        monkeypatch.setattr(mmearth_writer.os, "rename", rename)
        error = OSError
    with pytest.raises(error):
        convert(spec, src, out, overwrite=True, progress=False)
    assert _digest(out) == before and not _hidden(out)


def test_full_disk_is_one_error_and_keeps_the_previous_set(tmp_path, monkeypatch, capsys):
    src, spec = _source(tmp_path, {"a": (128, 128), "b": (128, 128)})
    out = tmp_path / "out"
    convert(spec, src, out, progress=False)
    before = _digest(out)
    real = mmearth_writer._GuardedFile.write
    budget = {"bytes": 30_000}

    def write(self, buf):  # the disk fills up after 30 kB, as the real file would see it
        budget["bytes"] -= len(buf)
        if budget["bytes"] < 0 and self.error is None:
            self.error = OSError(errno.ENOSPC, "No space left on device")
        return real(self, buf)
    monkeypatch.setattr(mmearth_writer._GuardedFile, "write", write)
    assert main(_args(spec, src, out, "--overwrite")) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: no space left on {tmp_path} (writing {out})")
    assert _digest(out) == before and not _hidden(out)


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    ok = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                        capture_output=True).returncode == 0
    probe.rmdir()
    return ok


@pytest.mark.slow
def test_real_full_disk_gives_one_line_and_no_crash(tmp_path):
    """A 256 kB tmpfs (in a private mount namespace) fills up during the HDF5 write: exit status 2, one
    'no space left' line, no segfault, nothing left on the small disk."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs unshare -rm and tmpfs mounts (unprivileged user namespaces)")
    src, spec = _source(tmp_path, {"a": (256, 256)})
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = (f"mount -t tmpfs -o size=256k tmpfs {disk} && {sys.executable} {REPO / 'tools/geotiff_to_mmearth.py'} "
           f"--spec {spec} --src {src} --out {disk / 'out'}; rc=$?; ls -A {disk}; exit $rc")
    run = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    errors = _error_lines(run.stderr)
    assert run.returncode == 2, run.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on {disk} (writing {disk / 'out'})")
    assert run.stdout.strip() == ""  # the partial file set was removed


@pytest.mark.slow
def test_killed_conversion_leaves_previous_set_and_is_reported(tmp_path):
    """kill -9 in the middle of the rows: the previous file set is byte-identical, the hidden partial folder
    is named by the next run, which then succeeds."""
    src, spec = _source(tmp_path, {"a": (128, 128), "b": (128, 128)})
    out = tmp_path / "out"
    convert(spec, src, out, progress=False)
    before = _digest(out)
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from utils.data import mmearth_writer\n"
        "from tools.geotiff_to_mmearth import convert\n"
        "real = mmearth_writer.MMEarthWriter.write\n"
        "def write(self, *a, **k):\n"
        "    real(self, *a, **k)\n"
        "    os.kill(os.getpid(), 9)\n"
        "mmearth_writer.MMEarthWriter.write = write\n"
        f"convert({str(spec)!r}, {str(src)!r}, {str(out)!r}, overwrite=True, progress=False)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9
    assert _digest(out) == before
    left = _hidden(out)
    assert len(left) == 1 and left[0].startswith(".out.partial-")
    summary = convert(spec, src, out, overwrite=True, progress=False)
    assert [p.name for p in summary["leftovers"]] == left


def test_several_inputs_go_into_one_file_set(tmp_path, shared_data_dir):
    import json

    terramesh, ssl4eo = shared_data_dir / "terramesh_examples", shared_data_dir / "ssl4eo_s12_1loc"
    if not (terramesh.is_dir() and ssl4eo.is_dir()):
        pytest.skip("the TerraMesh or SSL4EO samples are absent")
    specs = [REPO / "cfgs/data/terramesh_examples.yaml", REPO / "cfgs/data/ssl4eo_s12_1loc.yaml"]
    one = convert(specs[:1], [terramesh], tmp_path / "a" / "tm", progress=False)
    both = convert(specs, [terramesh, ssl4eo], tmp_path / "b" / "both", progress=False)
    alone = convert(specs[1:], [ssl4eo], tmp_path / "c" / "ssl", progress=False)
    assert both["num_tiles"] == one["num_tiles"] + alone["num_tiles"] == 90 + 64
    splits = json.loads((tmp_path / "b" / "both" / "both_splits.json").read_text())
    rows = sorted(r for v in splits.values() for r in v)
    assert rows == sorted(set(rows)) and len(rows) == 154 - len(both["empty_tiles"])
    with h5py.File(tmp_path / "b" / "both" / "both.h5") as h5, h5py.File(tmp_path / "c" / "ssl" / "ssl.h5") as ref:
        assert np.array_equal(h5["sentinel2"][90:], ref["sentinel2"][:])  # the second input's tiles follow
    with pytest.raises(ConversionError, match="--spec and --src come in pairs"):
        convert(specs, [terramesh], tmp_path / "d" / "x", progress=False)
