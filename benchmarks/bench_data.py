"""Throughput of MMEarthDataset against a naive, reference-like loader, warm and cold.

Usage::

    python benchmarks/bench_data.py --data /tmp/x/terramesh64 [--batch-size 128 --seconds 5 --workers 2
                                    --replicate 8000 --domains s2_rgb,elevation]

Prints one figure per line (``name: value``): ``samples_per_s`` (one process), ``samples_per_s_workers``
(``--workers`` DataLoader workers), ``naive_samples_per_s`` (the routine below), the ratios against it,
a bare open-once h5py loop for context, and the same with a cold cache (``cold_*``).

The naive routine does what the reference MultiMAE-EO loader does (``upstream_multimae_eo.md`` 4.2
and 4.3): reopen the HDF5 file for every sample, read the whole Sentinel-2 cube once per band group
and z-score all 13 bands in float64 (L2A stats), read ASTER and WorldCover (remapped in float64) and
``biome``, flip with torch and collate. It skips the reference's bilinear resize to ``input_size``
(``naive_resize_samples_per_s`` includes it), so the ratios are conservative. ``*_per_cpu_s`` figures
divide by this process's CPU time instead of wall time: they hold when other processes share the
machine.

Cold cache: the HDF5 chunk cache is disabled (``rdcc_nbytes=0``) and the file's pages are evicted
from the OS page cache before each cold run with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (works
without root for clean pages; ``/proc/sys/vm/drop_caches`` needs root and is tried first). Each cold
run reads rows in a fresh random order and never revisits a row, so with ``--replicate`` large
enough every read comes from disk, as with the 152-600 GB MMEarth files. A split smaller than three
batches (the 72 training rows of the converted TerraMesh sample) is read cold in batches of a third of it.

The ``speedup_*`` ratios divide by the naive routine of this script, a stand-in for the reference loader,
not by the reference's own code (BENCHMARKS.md gives how the two compare).

``--replicate N`` first copies the file's rows cyclically into a temporary N-row file (raw chunks
copied with ``write_direct_chunk``: the same real pixels and compression), so that runs longer
than one pass over a small real file do not measure re-reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.data.mmearth import MMEarthDataset  # noqa: E402
from utils.data.mmearth_files import resolve_fileset  # noqa: E402

_WC_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100, 255)
_S2_GROUPS = ([3, 2, 1], [4, 5, 6], [7, 8], [11, 12])


def drop_page_cache(path: Path) -> str:
    """Evict ``path`` from the OS page cache; returns how it was done."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "posix_fadvise"


def replicate(src_h5: Path, rows: int, out_dir: Path) -> Path:
    """Copy the rows of ``src_h5`` cyclically into an ``rows``-row file set (raw chunks, same filters)."""
    files = resolve_fileset(src_h5)
    folder = out_dir / f"{files.stem}_x{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(files.h5, "r") as src, h5py.File(folder / f"{folder.name}.h5", "w") as dst:
        for name, dset in src.items():
            n = dset.shape[0]
            out = dst.create_dataset(name, shape=(rows, *dset.shape[1:]), dtype=dset.dtype, chunks=dset.chunks,
                                     compression=dset.compression, compression_opts=dset.compression_opts)
            zero = (0,) * (dset.ndim - 1)
            for r in range(rows):
                mask, buf = dset.id.read_direct_chunk((r % n, *zero))
                out.id.write_direct_chunk((r, *zero), buf, mask)
    with h5py.File(files.h5, "r") as src:
        n = len(src["metadata"])
    split_rows = {}
    for name, members in json.loads(files.splits.read_text()).items():
        members = set(members)
        split_rows[name] = [r for r in range(rows) if r % n in members]
    (folder / f"{folder.name}_splits.json").write_text(json.dumps(split_rows))
    (folder / f"{folder.name}_band_stats.json").write_text(files.band_stats.read_text())
    return folder


class _Shuffled(Sampler):
    """Positions 0..n-1 in a seeded random order, a fresh order per pass; ``passes`` passes (None: forever)."""

    def __init__(self, n: int, seed: int, passes: int | None = None) -> None:
        self.n, self.seed, self.passes = n, seed, passes

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        done = 0
        while self.passes is None or done < self.passes:
            yield from rng.permutation(self.n).tolist()
            done += 1

    def __len__(self) -> int:
        return 10**9 if self.passes is None else self.n * self.passes


def _naive_sample(path: Path, row: int, stats: dict, size: int, flip: bool, rdcc: dict, resize: bool) -> dict:
    with h5py.File(path, "r", **rdcc) as h5:  # reopened for every sample
        out = {}
        mean, std = np.asarray(stats["sentinel2_l2a"]["mean"]), np.asarray(stats["sentinel2_l2a"]["std"])
        for g, idx in enumerate(_S2_GROUPS):  # the S2 cube read and normalised once per band group
            s2 = h5["sentinel2"][row].astype(np.float64)
            out[f"s2_{g}"] = ((s2 - mean[:, None, None]) / std[:, None, None])[idx]
        aster = h5["aster"][row].astype(np.float64)
        out["elevation"] = (aster[:1] - stats["aster"]["mean"][0]) / stats["aster"]["std"][0]
        wc = h5["esa_worldcover"][row].astype(np.float64)
        for i, code in enumerate(_WC_CODES):
            wc = np.where(wc == code, i, wc)
        out["worldcover"] = wc
        np.argmax(h5["biome"][row])
    res = {}
    for k, v in out.items():  # the reference resizes every modality to input_size (bilinear), then flips
        t = torch.from_numpy(v).float()
        if resize:
            t = F.interpolate(t[None], size=(size, size), mode="bilinear")[0]
        res[k] = torch.flip(t, dims=[-1]) if flip else t
    return res


def bench_naive(path: Path, rows: np.ndarray, batch: int, seconds: float, size: int, cold: bool,
                resize: bool = False) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of the reference-like routine, one process."""
    stats = json.loads(resolve_fileset(path).band_stats.read_text())
    rdcc = {"rdcc_nbytes": 0} if cold else {}
    order = np.random.default_rng(1).permutation(rows)
    flips = np.random.default_rng(2).random(len(order)) < 0.5
    done, t0, c0, k = 0, time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - t0 < seconds and (not cold or k + batch <= len(order)):  # cold: each row once
        sel = [(order[(k + j) % len(order)], flips[(k + j) % len(order)]) for j in range(batch)]
        default_collate([_naive_sample(path, int(r), stats, size, f, rdcc, resize) for r, f in sel])
        k += batch
        done += batch
    return done / (time.perf_counter() - t0), done / (time.process_time() - c0)


def bench_bare(path: Path, rows: np.ndarray, seconds: float) -> float:
    """Samples/s of an open-once h5py loop reading S2, ASTER and WorldCover rows (no processing)."""
    order = np.random.default_rng(1).permutation(rows)
    with h5py.File(path, "r", rdcc_nbytes=0) as h5:  # every read decompresses its chunk
        dsets = [h5["sentinel2"], h5["aster"], h5["esa_worldcover"]]
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for d in dsets:
                d[int(order[done % len(order)])]
            done += 1
    return done / (time.perf_counter() - t0)


def bench_dataset(ds: MMEarthDataset, batch: int, seconds: float, workers: int, cold: bool) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) of a DataLoader over ``ds`` in random
    order; the first batch (worker start-up) is not timed. The CPU figure is meaningful for ``workers=0``.
    Cold: one pass over the split (never revisiting a row, prefetching workers included)."""
    loader = DataLoader(ds, batch_size=batch, sampler=_Shuffled(len(ds), 1, passes=1 if cold else None),
                        num_workers=workers, persistent_workers=False, prefetch_factor=4 if workers else None,
                        drop_last=True)
    it = iter(loader)
    next(it)
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        try:
            next(it)
        except StopIteration:
            break
        done += batch
    rate = done / (time.perf_counter() - t0), done / (time.process_time() - c0)
    del it
    ds.close()  # HDF5 shares one open file (and its chunk cache) between handles of a process
    return rate


def main(argv=None) -> None:
    defaults = yaml.safe_load((REPO / "cfgs" / "defaults.yaml").read_text())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="MMEarth .h5 file or its folder")
    p.add_argument("--domains", default=",".join(defaults["in_domains"]), help="comma-separated domain names")
    p.add_argument("--split", default="train")
    p.add_argument("--input-size", type=int, default=defaults["data"]["input_size"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--replicate", type=int, default=0, help="copy rows cyclically into a file of this many rows")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache measurements")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        data = Path(args.data)
        if args.replicate:
            data = replicate(data, args.replicate, Path(tmp))
        h5 = resolve_fileset(data).h5
        domains = args.domains.split(",")
        kw = dict(input_size=args.input_size, augment=True)
        ds = MMEarthDataset(data, domains, args.split, **kw)
        print(f"data: {h5} ({h5.stat().st_size / 2**20:.1f} MiB, {ds.num_rows} rows, {len(ds)} in split "
              f"{args.split!r}, {ds.tile_size} px), domains: {','.join(domains)}, batch {args.batch_size}")
        res = {}
        wall_cpu = {
            "naive": bench_naive(h5, ds.rows, args.batch_size, args.seconds, args.input_size, False),
            "naive_resize": bench_naive(h5, ds.rows, args.batch_size, args.seconds, args.input_size, False, True),
        }
        res["bare_h5py_samples_per_s"] = bench_bare(h5, ds.rows, args.seconds)
        wall_cpu["dataset"] = bench_dataset(ds, args.batch_size, args.seconds, 0, False)
        res["naive_samples_per_s"], res["naive_samples_per_cpu_s"] = wall_cpu["naive"]
        res["naive_resize_samples_per_s"] = wall_cpu["naive_resize"][0]
        res["samples_per_s"], res["samples_per_cpu_s"] = wall_cpu["dataset"]
        res["samples_per_s_workers"] = bench_dataset(ds, args.batch_size, args.seconds, args.workers, False)[0]
        res["speedup_vs_naive"] = res["samples_per_s"] / res["naive_samples_per_s"]
        res["speedup_cpu_vs_naive"] = res["samples_per_cpu_s"] / res["naive_samples_per_cpu_s"]
        res["speedup_vs_naive_resize"] = res["samples_per_s"] / res["naive_resize_samples_per_s"]
        res["speedup_workers_vs_naive"] = res["samples_per_s_workers"] / res["naive_samples_per_s"]
        # A cold run reads every row at most once: one untimed batch, then at least two timed ones, so a
        # split smaller than 3 batches is read in smaller batches.
        cold_batch = min(args.batch_size, len(ds) // 3)
        if not args.no_cold and cold_batch >= 1:
            cold = MMEarthDataset(data, domains, args.split, rdcc_nbytes=0, **kw)
            how = drop_page_cache(h5)
            res["cold_naive_samples_per_s"] = bench_naive(h5, ds.rows, cold_batch, args.seconds,
                                                          args.input_size, True)[0]
            drop_page_cache(h5)
            res["cold_samples_per_s"] = bench_dataset(cold, cold_batch, args.seconds, 0, True)[0]
            drop_page_cache(h5)
            res["cold_samples_per_s_workers"] = bench_dataset(cold, cold_batch, args.seconds, args.workers, True)[0]
            res["cold_speedup_vs_naive"] = res["cold_samples_per_s"] / res["cold_naive_samples_per_s"]
            print(f"cold cache: rdcc_nbytes=0, page cache dropped with {how}; one pass over the {len(ds)} rows in "
                  f"batches of {cold_batch}" + ("" if cold_batch == args.batch_size else
                                               " (a short run on a small split: --replicate N for a longer one)"))
        elif not args.no_cold:
            print(f"cold cache: skipped, the split has {len(ds)} rows (fewer than 3)")
        print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()} on {os.cpu_count()} CPUs")
        print("ratios: *_vs_naive = MMEarthDataset's samples/s over this script's naive stand-in of the reference "
              "loader (same process), not over the reference's own code")
        for k, v in res.items():
            print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()
