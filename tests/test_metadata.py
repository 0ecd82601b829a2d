"""Metadata tokens (multimae/metadata.py), their place in the encoder, and the MMEarth metadata entry
(utils/data/mmearth_metadata.py): hand-computed encodings, the missing embedding exactly where a value is absent."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch

from multimae.build import build_encoder, build_pretraining, random_metadata
from multimae.encoder import MultiModalEncoder, patch_layout
from multimae.metadata import MetadataAdapter, cyclic_encoding
from tests.multimae_fixture import random_batch, tiny_cfg
from tests.terramesh_fixture import convert_terramesh
from utils.data.mmearth import MMEarthDataset
from utils.data.mmearth_metadata import _tile_info_pairs, parse_date

S3 = math.sqrt(3) / 2


def test_cyclic_encodings_match_hand_values():
    got = {
        "lat 30": cyclic_encoding(30.0, 360.0), "lon -90": cyclic_encoding(-90.0, 360.0),
        "month 3": cyclic_encoding(3, 12.0), "week 13": cyclic_encoding(13, 52.0),
        "hour 6": cyclic_encoding(6.0, 24.0), "hour 20": cyclic_encoding(20.0, 24.0),
        "day 365.25 / 2": cyclic_encoding(365.25 / 2, 365.25),
    }
    want = {"lat 30": (0.5, S3), "lon -90": (-1.0, 0.0), "month 3": (1.0, 0.0), "week 13": (1.0, 0.0),
            "hour 6": (1.0, 0.0), "hour 20": (-S3, 0.5), "day 365.25 / 2": (0.0, -1.0)}
    for key, pair in want.items():
        np.testing.assert_allclose(got[key], pair, atol=1e-6, err_msg=key)
    assert cyclic_encoding(np.array([1.0, np.nan]), 12.0).shape == (2, 2)
    assert np.isnan(cyclic_encoding(np.array([1.0, np.nan]), 12.0)[1]).all()


def test_dates_give_iso_week_day_of_year_and_utc_hour():
    day, hour = parse_date("2019-03-15")
    assert day == dt.date(2019, 3, 15) and hour is None
    day, hour = parse_date("2021-07-21T08:40:10.000000000")  # GeoTIFF datetime tags carry nanoseconds
    assert day == dt.date(2021, 7, 21) and hour == pytest.approx(8 + 40 / 60 + 10 / 3600)
    assert parse_date(None) is None and parse_date("2019-02-30") is None and parse_date("n/a") is None


def test_the_missing_embedding_is_used_exactly_where_a_value_is_absent():
    torch.manual_seed(0)
    adapter = MetadataAdapter(["lat", "week"], dim=8)
    lat = torch.tensor([[0.5, S3], [float("nan"), float("nan")], [-1.0, 0.0]])
    week = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, float("nan")]])  # sample 2: half a pair is still absent
    tokens = adapter({"lat": lat, "week": week}, 3)
    assert tokens.shape == (3, 2, 8)
    proj_lat, proj_week = adapter.proj["lat"], adapter.proj["week"]
    torch.testing.assert_close(tokens[0, 0], lat[0] @ proj_lat.weight.T + proj_lat.bias)
    torch.testing.assert_close(tokens[2, 0], lat[2] @ proj_lat.weight.T + proj_lat.bias)
    torch.testing.assert_close(tokens[1, 0], adapter.missing["lat"])
    torch.testing.assert_close(tokens[:2, 1], week[:2] @ proj_week.weight.T + proj_week.bias)
    torch.testing.assert_close(tokens[2, 1], adapter.missing["week"])
    assert not torch.equal(adapter.missing["lat"], torch.zeros(8))  # learned, not zero-fill
    tokens.sum().backward()
    assert torch.isfinite(proj_lat.weight.grad).all()  # NaN never enters the graph
    torch.testing.assert_close(adapter.missing["lat"].grad, torch.ones(8))  # one absent sample
    torch.testing.assert_close(adapter.missing["week"].grad, torch.ones(8))


def test_a_batch_without_a_field_uses_the_missing_embedding_with_one_warning():
    adapter = MetadataAdapter(["lat", "lon"], dim=4)
    with pytest.warns(UserWarning, match=r"field\(s\) 'lon' not in the batch"):
        tokens = adapter({"lat": torch.zeros(2, 2)}, 2)
    torch.testing.assert_close(tokens[:, 1], adapter.missing["lon"].expand(2, -1))
    with pytest.warns(UserWarning, match=r"field\(s\) 'lat' not in the batch") as record:
        adapter(None, 2)
    assert len(record) == 1  # lon warned already


def _meta_cfg(**model):
    cfg = tiny_cfg()
    cfg["model"].update(metadata=["lat", "week", "hour"], **model)
    return cfg


def test_encoder_metadata_tokens_are_non_grid_segments_after_the_patches():
    torch.manual_seed(0)
    cfg = _meta_cfg()
    enc = build_encoder(cfg).eval()
    layout = enc.layout()
    assert layout.domains == [*cfg["in_domains"], "lat", "week", "hour"]
    assert [s.grid for s in layout.segments[-3:]] == [None, None, None]
    assert patch_layout(layout).domains == cfg["in_domains"] and patch_layout(layout).num_tokens == 24
    inputs, valid = random_batch(cfg)
    meta = random_metadata(cfg, 3, generator=torch.Generator().manual_seed(1))
    tok = enc.tokenize(inputs, valid, meta)
    assert tok.tokens.shape == (3, 27, 32) and tok.valid[:, 24:].all() and not tok.valid[0, 0]
    torch.testing.assert_close(tok.tokens[:, 24], enc.metadata_adapter.proj["lat"](meta["lat"]))
    out = enc.encode(inputs, valid=valid, metadata=meta)
    assert out.shape == (3, 27 + 1, 32)
    # Fine-tuning data without metadata: the missing embeddings, the same as all-NaN pairs.
    with pytest.warns(UserWarning, match="not in the batch"):
        without = enc.encode(inputs, valid=valid)
    nan = {k: torch.full_like(v, float("nan")) for k, v in meta.items()}
    torch.testing.assert_close(without, enc.encode(inputs, valid=valid, metadata=nan))
    assert torch.isfinite(without).all() and not torch.allclose(without, out)
    again = MultiModalEncoder.from_spec(enc.spec)
    again.load_state_dict(enc.state_dict())  # strict: the metadata adapter round-trips through the spec
    assert again.metadata_fields == ["lat", "week", "hour"]
    assert {"metadata_adapter.missing.lat", "metadata_adapter.missing.hour"} <= enc.no_weight_decay()


def test_multimae_keeps_metadata_out_of_the_budget_and_its_decoders_attend_to_them():
    torch.manual_seed(0)
    cfg = _meta_cfg()
    model = build_pretraining(cfg).eval()
    inputs, valid = random_batch(cfg)
    meta = random_metadata(cfg, 3, generator=torch.Generator().manual_seed(1))
    preds, masks = model.predict(inputs, valid=valid, metadata=meta, generator=torch.Generator().manual_seed(0))
    assert set(masks) >= set(cfg["in_domains"]) and not set(masks) & {"lat", "week", "hour"}
    visible = sum((1 - masks[d]).sum(dim=1) for d in cfg["in_domains"])
    assert visible.tolist() == [8.0] * 3  # the budget K counts patch tokens only
    other = {k: -v for k, v in meta.items()}
    preds2, masks2 = model.predict(inputs, valid=valid, metadata=other, generator=torch.Generator().manual_seed(0))
    for d in masks:
        torch.testing.assert_close(masks[d], masks2[d])  # same mask ...
    assert not torch.allclose(preds["s2_rgb"], preds2["s2_rgb"])  # ... other metadata, other reconstruction
    out = model({"inputs": inputs, "valid": valid, "metadata": meta}, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert model.encoder.metadata_adapter.proj["lat"].weight.grad.abs().sum() > 0


def test_mmearth_dataset_delivers_the_metadata_entry(mmearth_fileset):
    fields = ["lat", "lon", "month", "week", "day_of_year", "hour"]
    _tile_info_pairs.cache_clear()  # the warnings come once per file and process
    with pytest.warns(UserWarning, match="'hour'.*time of day"):
        ds = MMEarthDataset(mmearth_fileset, ["s2_rgb"], "train", metadata=fields)
    batch = ds.__getitems__([0, 1])
    rows = ds.rows[:2]
    h5_path = next(mmearth_fileset.glob("*.h5"))
    with h5py.File(h5_path, "r") as h5:
        lat, month = h5["lat"][:][rows], h5["month"][:][rows]
        ids = [h5["metadata"][int(r)][0].decode() for r in rows]
    info = json.loads(next(mmearth_fileset.glob("*_tile_info.json")).read_text())
    for b, sample in enumerate(batch):
        meta = sample["metadata"]
        assert set(meta) == set(fields) and all(v.dtype == torch.float32 and v.shape == (2,) for v in meta.values())
        np.testing.assert_allclose(meta["lat"].numpy(), lat[b])
        np.testing.assert_allclose(meta["month"].numpy(), month[b])
        day = dt.date.fromisoformat(info[ids[b]]["S2_DATE"])
        week, doy = day.isocalendar()[1], day.timetuple().tm_yday
        np.testing.assert_allclose(meta["week"].numpy(), [math.sin(2 * math.pi * week / 52),
                                                          math.cos(2 * math.pi * week / 52)], atol=1e-6)
        np.testing.assert_allclose(meta["day_of_year"].numpy(), [math.sin(2 * math.pi * doy / 365.25),
                                                                 math.cos(2 * math.pi * doy / 365.25)], atol=1e-6)
        assert torch.isnan(meta["hour"]).all()  # MMEarth dates carry no time of day
    plain = MMEarthDataset(mmearth_fileset, ["s2_rgb"], "train")
    assert "metadata" not in plain[0]


def test_metadata_absent_from_the_file_set_is_named_once(mmearth_fileset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mmearth_fileset, broken)
    with h5py.File(next(broken.glob("*.h5")), "a") as h5:
        del h5["month"]
    next(broken.glob("*_tile_info.json")).unlink()
    with pytest.warns(UserWarning) as record:
        ds = MMEarthDataset(broken, ["s2_rgb"], "train", metadata=["lat", "month", "week"])
    messages = [str(r.message) for r in record]
    assert len(messages) == 2
    assert "'month'" in messages[0] and "no dataset 'month'" in messages[0] and "missing embedding" in messages[0]
    assert "'week'" in messages[1] and "tile_info.json" in messages[1]
    meta = ds[0]["metadata"]
    assert torch.isnan(meta["month"]).all() and torch.isnan(meta["week"]).all() and torch.isfinite(meta["lat"]).all()
    with pytest.raises(ValueError, match="model.metadata: unknown metadata field 'altitude'"):
        MMEarthDataset(broken, ["s2_rgb"], "train", metadata=["altitude"])


def test_real_terramesh_tiles_carry_their_place_and_week(shared_data_dir, tmp_path):
    out = convert_terramesh(shared_data_dir, tmp_path / "terramesh64")
    ds = MMEarthDataset(out, ["s2"], "train", input_size=40, metadata=["week", "lat", "lon"])
    info = json.loads((out / "terramesh64_tile_info.json").read_text())
    with h5py.File(out / "terramesh64.h5", "r") as h5:
        ids = [h5["metadata"][int(r)][0].decode() for r in ds.rows]
    for i in (0, len(ds) - 1):
        entry, meta = info[ids[i]], ds[i]["metadata"]
        day = dt.date.fromisoformat(entry["DATES"][entry["MONTH_SOURCE"]])  # the S2 files carry no date
        week = day.isocalendar()[1]
        np.testing.assert_allclose(meta["week"].numpy(), [math.sin(2 * math.pi * week / 52),
                                                          math.cos(2 * math.pi * week / 52)], atol=1e-6)
        lat = math.radians(entry["lat"])
        np.testing.assert_allclose(meta["lat"].numpy(), [math.sin(lat), math.cos(lat)], atol=1e-5)
