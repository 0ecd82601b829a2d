"""Dirichlet token-budget masking: exact budget, Dirichlet shares, no-data tokens, seeding, errors."""

import pytest
import torch

from multimae.masking import mask_to_ids, random_masks, split_masks


def _visible_per_domain(mask, sizes):
    return torch.stack([(1 - m).sum(dim=1) for m in torch.split(mask, sizes, dim=1)], dim=1)  # (B, n)


@pytest.mark.parametrize("k", [1, 7, 49, 100, 196])
@pytest.mark.parametrize("uniform", [False, True])
def test_exactly_k_visible_per_sample(k, uniform):
    mask = random_masks([49] * 4, 64, k, 0.5, sample_domains_uniformly=uniform)
    assert mask.shape == (64, 196)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert ((1 - mask).sum(dim=1) == k).all()


@pytest.mark.parametrize(
    "alphas, expected",
    [(1.0, [0.25, 0.25, 0.25, 0.25]), ([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4])],
)
def test_dirichlet_share_matches_expectation(alphas, expected):
    torch.manual_seed(0)
    mask = random_masks([64] * 4, 4000, 32, alphas)
    share = _visible_per_domain(mask, [64] * 4).float().mean(dim=0) / 32
    torch.testing.assert_close(share, torch.tensor(expected), atol=0.015, rtol=0)


def test_uniform_domain_subsets_leave_domains_out():
    torch.manual_seed(0)
    mask = random_masks([64] * 3, 4000, 30, 1.0, sample_domains_uniformly=True)
    empty = (_visible_per_domain(mask, [64] * 3) == 0).float().mean(dim=0)
    # A domain is left out of 3 of the 7 non-empty subsets (3/7 = 0.43); a rounding shortfall is
    # filled with random tokens of any domain, so slightly fewer stay empty.
    assert ((empty > 0.36) & (empty < 0.47)).all(), empty


def test_nodata_tokens_are_visible_only_when_nothing_valid_is_left():
    torch.manual_seed(0)
    sizes = [16, 16, 16]
    valid = torch.ones(200, 48, dtype=torch.bool)
    valid[:, :16] = False  # domain 0 is missing in every sample
    valid[:, 16:20] = False  # a few no-data patches in domain 1
    mask = random_masks(sizes, 200, 12, 1.0, token_valid=valid)
    assert ((1 - mask).sum(dim=1) == 12).all()
    assert (mask[~valid] == 1).all()  # budget went to real data
    # Fewer valid tokens than K: every valid token is shown, no-data tokens fill the rest.
    mask = random_masks(sizes, 200, 40, 1.0, token_valid=valid)
    assert (mask[valid] == 0).all() and ((1 - mask).sum(dim=1) == 40).all()


def test_generator_makes_masks_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = random_masks([9, 9], 8, 5, 1.0, generator=torch.Generator().manual_seed(3))
    b = random_masks([9, 9], 8, 5, 1.0, generator=torch.Generator().manual_seed(3))
    c = random_masks([9, 9], 8, 5, 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_fixes_the_whole_mask_and_leaves_global_rngs_alone():
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    a, b = (
        random_masks([9, 9], 8, 5, 1.0, sample_domains_uniformly=True, generator=torch.Generator("cuda").manual_seed(3))
        for _ in range(2)
    )
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)

def test_mask_to_ids_keeps_token_order_and_restores():
    mask = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 1, 0, 0]])
    ids_keep, ids_restore = mask_to_ids(mask)
    assert ids_keep.tolist() == [[1, 3, 4], [0, 3, 4]]
    tokens = torch.arange(10.0).view(2, 5)
    visible = torch.gather(tokens, 1, ids_keep)
    filled = torch.cat([visible, torch.full((2, 2), -1.0)], dim=1)
    restored = torch.gather(filled, 1, ids_restore)
    assert torch.equal(restored, torch.where(mask > 0, -1.0, tokens))
    parts = split_masks(mask, ["a", "b"], [2, 3])
    assert parts["a"].shape == (2, 2) and parts["b"].shape == (2, 3)


def test_mask_to_ids_rejects_uneven_budgets():
    with pytest.raises(ValueError, match="same, non-zero number of visible tokens"):
        mask_to_ids(torch.tensor([[0.0, 1, 1], [0, 0, 1]]))


def test_bad_budget_and_alphas_name_the_config_key():
    with pytest.raises(ValueError, match="masking.num_encoded_tokens"):
        random_masks([4, 4], 2, 9, 1.0)
    with pytest.raises(ValueError, match="masking.alphas"):
        random_masks([4, 4], 2, 3, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="masking.alphas"):
        random_masks([4, 4], 2, 3, [1.0, 0.0])
