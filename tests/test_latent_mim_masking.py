"""Latent MIM's four-role band-set masking (multimae/objectives/latent_mim_masking.py): invariants, the band-set
rules, redraws, determinism per sample seed, and the same masks for any data-loader worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from multimae.objectives.latent_mim_masking import DECODER, ENCODER, MISSING, TARGET_ONLY, ModalityCrossMasking
from utils.data.mmearth import MMEarthDataset

DOMAINS = ["s2_10m", "s2_20m", "s2_60m", "s1", "elevation", "worldcover"]
DECODE_ONLY = ["elevation", "worldcover"]
N = 16  # 4 x 4 tokens per domain (32 px, patch 8)


def masking(domains=DOMAINS, decode_only=DECODE_ONLY, **kw) -> ModalityCrossMasking:
    return ModalityCrossMasking(domains, {d: (4, 4) for d in domains}, {d: 8 for d in domains}, decode_only, **kw)


def all_valid(domains=DOMAINS) -> dict[str, np.ndarray]:
    return {d: np.ones(N, bool) for d in domains}


def roles_of(r: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate(list(r.values()))


def test_four_roles_missing_decode_only_and_both_kinds_present_over_many_draws():
    m = masking()
    valid = all_valid()
    valid["s2_20m"][:5] = False  # a cloud over five patches of one band set
    valid["s1"][:] = False  # no Sentinel-1 at all
    valid["worldcover"][3] = False
    seen = set()
    for seed in range(300):
        r = m.draw(valid, np.random.default_rng([seed, 0]))
        flat = roles_of(r)
        assert set(np.unique(flat)) <= {ENCODER, TARGET_ONLY, DECODER, MISSING}
        for d in DOMAINS:
            assert r[d].shape == (N,) and r[d].dtype == np.int8
            np.testing.assert_array_equal(r[d] == MISSING, ~valid[d], err_msg=d)  # missing = exactly no data
        for d in DECODE_ONLY:
            assert not (r[d] == ENCODER).any()  # decode-only never encoded
        assert (flat == ENCODER).any() and (flat == DECODER).any()
        seen |= {(d, int(v)) for d in DOMAINS for v in np.unique(r[d])}
    assert {(d, DECODER) for d in DOMAINS if d != "s1"} <= seen  # every present band set gets decoded sometimes
    assert {(d, ENCODER) for d in ("s2_10m", "s2_20m", "s2_60m")} <= seen


def test_base_mask_splits_each_modality_by_the_ratios():
    # One modality of three band sets (48 tokens) and no decode-only domain: int(48 * 0.5) = 24 encoder and
    # int(48 * 0.25) = 12 decoder tokens; all three band sets are encoded (min_encoded 3), and the band-set
    # step can only turn decoder tokens into target-only.
    m = masking(["s2_10m", "s2_20m", "s2_60m"], [], encode_ratio=0.5, decode_ratio=0.25, min_encoded=3)
    for seed in range(50):
        r = roles_of(m.draw(all_valid(m.domains), np.random.default_rng(seed)))
        assert (r == ENCODER).sum() == 24
        assert 1 <= (r == DECODER).sum() <= 12
    with pytest.raises(ValueError, match="encode_ratio 0.7 and decode_ratio 0.5"):
        masking(encode_ratio=0.7)


def test_two_present_band_sets_encode_the_first_and_decode_the_second():
    m = masking(["s2_10m", "s1"], [])
    for seed in range(30):
        r = m.draw(all_valid(m.domains), np.random.default_rng(seed))
        assert (r["s2_10m"] == ENCODER).sum() == 8 and not (r["s2_10m"] == DECODER).any()
        assert (r["s1"] == DECODER).sum() == 8 and not (r["s1"] == ENCODER).any()


def test_one_present_band_set_is_redone_as_a_random_fill_of_its_valid_tokens():
    m = masking(["s2_10m", "s1"], [])
    valid = all_valid(m.domains)
    valid["s1"][:] = False
    valid["s2_10m"][10:] = False  # 10 valid tokens left
    r = m.draw(valid, np.random.default_rng(0))
    assert (r["s2_10m"] == ENCODER).sum() == 5 and (r["s2_10m"] == DECODER).sum() == 5  # half of the valid ones
    assert (r["s1"] == MISSING).all()


def test_a_sample_without_valid_encodable_tokens_has_no_encoder_token():
    m = masking()
    valid = {d: np.zeros(N, bool) for d in DOMAINS}
    valid["worldcover"][:] = True  # only a decode-only map holds data
    r = m.draw(valid, np.random.default_rng(0))
    assert not (roles_of(r) == ENCODER).any()
    assert all((r[d] == MISSING).all() for d in DOMAINS if d != "worldcover")


def test_views_are_independent_and_fixed_by_the_sample_seed():
    m = masking()
    x = torch.zeros(4, 32, 32)
    sample = {"inputs": {d: x if d != "worldcover" else torch.zeros(32, 32, dtype=torch.long) for d in DOMAINS},
              "valid": {d: torch.ones(32, 32, dtype=torch.bool) for d in DOMAINS}}
    a = m([dict(sample)], np.array([7], np.uint64))[0]["roles"]
    b = m([dict(sample)], np.array([7], np.uint64))[0]["roles"]
    c = m([dict(sample)], np.array([8], np.uint64))[0]["roles"]
    assert a["s2_10m"].shape == (2, N) and a["s2_10m"].dtype == torch.int8
    assert all(torch.equal(a[d], b[d]) for d in DOMAINS)
    assert not all(torch.equal(a[d], c[d]) for d in DOMAINS)
    assert not all(torch.equal(a[d][0], a[d][1]) for d in DOMAINS)  # two different views
    # a no-data class pixel makes its token missing, as the encoder's token validity does
    sample["inputs"]["worldcover"] = torch.full((32, 32), -1)
    sample["inputs"]["worldcover"][:8, :8] = 3
    r = m([sample], np.array([7], np.uint64))[0]["roles"]["worldcover"]
    assert (r[:, 1:] == MISSING).all() and (r[:, 0] != MISSING).all()


def _as_list(samples: list[dict]) -> list[dict]:
    return samples


def _roles_by_row(dataset, num_workers: int) -> dict[int, dict[str, torch.Tensor]]:
    loader = DataLoader(dataset, batch_size=3, shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    return {s["index"]: s["roles"] for batch in loader for s in batch}


def test_same_masks_for_any_worker_count_and_batch_order(mmearth_fileset):
    domains = ["s2_10m", "s2_20m", "s1", "worldcover"]
    m = ModalityCrossMasking(domains, {d: (2, 2) for d in domains}, {d: 8 for d in domains}, ["worldcover"])
    ds = MMEarthDataset(mmearth_fileset, domains, "train", input_size=16, augment=True, seed=3, batch_transform=m)
    ds.set_epoch(2)
    serial, parallel = _roles_by_row(ds, 0), _roles_by_row(ds, 2)
    assert serial.keys() == parallel.keys() and len(serial) == len(ds)
    for row in serial:
        assert all(torch.equal(serial[row][d], parallel[row][d]) for d in domains), row
    reordered = {s["index"]: s["roles"] for s in ds.__getitems__(list(range(len(ds)))[::-1])}
    for row in serial:  # a row's masks do not depend on its batch or position (resume mid-epoch)
        assert all(torch.equal(serial[row][d], reordered[row][d]) for d in domains), row
    ds.set_epoch(3)
    other = {s["index"]: s["roles"] for s in ds.__getitems__(list(range(len(ds))))}
    assert any(not torch.equal(serial[r]["s2_10m"], other[r]["s2_10m"]) for r in serial)  # new epoch, new masks
