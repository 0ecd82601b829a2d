"""Tests of the modality / domain registry (multimae/domains.py)."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from multimae.domains import (
    DOMAINS, IGNORE_INDEX, MODALITIES, Domain, band_indices, canonical_band_name, get_domain, get_modality,
)

REPO = Path(__file__).resolve().parents[1]


def test_unknown_names_list_valid_ones():
    with pytest.raises(KeyError, match=r"unknown modality 'sentinel3'.*sentinel2"):
        get_modality("sentinel3")
    with pytest.raises(KeyError, match=r"unknown domain 'depth'.*elevation.*worldcover"):
        get_domain("depth")
    with pytest.raises(KeyError, match=r"unknown band 'B8B' for modality 'sentinel2'.*B8A, B08"):
        band_indices("sentinel2", ["B04", "B8B"])
    with pytest.raises(KeyError, match=r"unknown band 'B13'.*valid bands"):
        Domain("bad", "sentinel2", ("B13",))


def test_sentinel2_order_is_mmearth_order_b8a_before_b08():
    assert MODALITIES["sentinel2"].bands[7:9] == ("B8A", "B08")
    assert band_indices("sentinel2", ["B8A", "B08"]) == [7, 8]
    # MMEarth's own spelling is accepted and canonicalised.
    assert band_indices("sentinel2", ["B4", "b3", "B2", "B8", "B8a"]) == [3, 2, 1, 8, 7]
    assert canonical_band_name("sentinel2", "B1") == "B01"
    assert canonical_band_name("aster", "B1") == "B1"
    # The reference EO band groups (upstream_multimae_eo.md section 2).
    assert get_domain("s2_rgb").band_indices == [3, 2, 1]
    assert get_domain("s2_rededge").band_indices == [4, 5, 6]
    assert get_domain("s2_nir").band_indices == [7, 8]
    assert get_domain("s2_swir").band_indices == [11, 12]
    assert 10 not in get_domain("s2").band_indices  # no B10


def test_categorical_tables_are_aligned_and_exclude_nodata():
    for mod in MODALITIES.values():
        np.dtype(mod.dtype)  # a real numpy dtype
        if mod.kind in ("categorical", "onehot"):
            assert len(mod.class_values) == len(mod.class_names) == mod.num_classes > 0
            assert not set(mod.class_values) & set(mod.nodata), mod.name
        if mod.class_colors:
            assert len(mod.class_colors) == len(mod.class_values)
    wc = MODALITIES["esa_worldcover"]
    assert wc.class_values[0] == 10 and wc.class_values[-1] == 100 and {0, 255} <= set(wc.nodata)
    assert MODALITIES["dynamic_world"].class_values == tuple(range(1, 10))
    assert IGNORE_INDEX == -1


def test_domains_are_consistent():
    assert "depth" not in DOMAINS and "semseg" not in DOMAINS
    for d in DOMAINS.values():
        assert d.num_channels == len(d.bands)
        if d.is_output_only:
            src = get_domain(d.source)
            assert src.modality == d.modality and src.bands == d.bands
        if d.kind == "categorical":
            assert d.num_classes > 0 and d.num_channels == 1
    with pytest.raises(KeyError, match="unknown band 'B13' for modality 'sentinel2'"):
        Domain("s2_b13", "sentinel2", ("B13",))


def test_default_config_domains_resolve():
    cfg = yaml.safe_load((REPO / "cfgs" / "defaults.yaml").read_text())
    for name in cfg["in_domains"] + cfg["multimae"]["out_domains"] + cfg["multimae"]["loss"]["norm_pix"]:
        get_domain(name)


def test_domain_class_tables_default_to_the_modality_and_worldcover12_is_the_reference_table():
    wc = MODALITIES["esa_worldcover"]
    assert get_domain("worldcover").class_values == wc.class_values and get_domain("worldcover").num_classes == 11
    assert get_domain("s2_rgb").class_values == () and get_domain("s2_rgb").num_classes == 0
    ref = get_domain("worldcover12")
    # The reference's remap: codes 10, 20, ..., 100 -> 0..10 (this registry's order), 255 -> 11.
    assert ref.class_values == (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100, 255)
    assert ref.num_classes == 12 and ref.class_names[:11] == wc.class_names and len(ref.class_colors) == 12
    assert ref.label_downsample == 4 and ref.modality == "esa_worldcover"


def test_domain_class_table_errors():
    with pytest.raises(ValueError, match="only categorical domains take a class table"):
        Domain("bad", "aster", ("elevation",), "l1", class_values=(1,), class_names=("a",), class_colors=("#000000",))
    with pytest.raises(ValueError, match="must have the same, non-zero length; got 2, 1, 2"):
        Domain("bad", "esa_worldcover", ("Map",), "ce", class_values=(10, 20), class_names=("a",),
               class_colors=("#000000", "#ffffff"))
    with pytest.raises(ValueError, match="codes storable as uint8"):
        Domain("bad", "esa_worldcover", ("Map",), "ce", class_values=(10, 256), class_names=("a", "b"),
               class_colors=("#000000", "#ffffff"))
    with pytest.raises(ValueError, match="lists a code twice"):
        Domain("bad", "esa_worldcover", ("Map",), "ce", class_values=(10, 10), class_names=("a", "b"),
               class_colors=("#000000", "#ffffff"))
