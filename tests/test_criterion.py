"""Masked losses: masked tokens and valid pixels only, norm-pix targets, CE with ignore, weighting."""

import pytest
import torch

from multimae.adapters import majority_pool
from multimae.criterion import MultiMAECriterion, norm_pix_target

B, S, P = 2, 16, 8  # 16 px, patch 8 -> 4 tokens per domain


def _mask(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mse_counts_masked_tokens_and_valid_pixels_only():
    crit = MultiMAECriterion(["s2_rgb"], patch_size=P)
    pred = torch.zeros(B, 3, S, S)
    target = torch.zeros(B, 3, S, S)
    target[:, :, :8, :8] = 2.0  # token 0: error 4 per pixel
    target[:, :, :8, 8:] = 1.0  # token 1: error 1
    valid = torch.ones(B, S, S, dtype=torch.bool)
    valid[1, :8, 8:12] = False  # half of token 1 of sample 1 is no-data
    target[1, :, :8, 8:12] = 1000.0  # ... with a wild value
    masks = {"s2_rgb": _mask([1, 1, 0, 0], [0, 1, 0, 1])}
    out = crit({"s2_rgb": pred}, {"s2_rgb": target}, masks, {"s2_rgb": valid})
    # sample 0: tokens 0, 1 -> (64 * 4 + 64 * 1) / 128 = 2.5; sample 1: tokens 1 (32 valid px), 3 -> 32 / 96
    expected = (2.5 + 32 / 96) / 2
    assert out["s2_rgb"].item() == pytest.approx(expected)
    assert out["loss"].item() == pytest.approx(expected)


def test_loss_on_unmasked_counts_every_token():
    crit = MultiMAECriterion(["elevation"], patch_size=P, losses={"elevation": "l1"}, loss_on_unmasked=True)
    pred = torch.zeros(B, 1, S, S)
    target = torch.full((B, 1, S, S), -3.0)
    out = crit({"elevation": pred}, {"elevation": target}, {"elevation": torch.zeros(B, 4)})
    assert out["elevation"].item() == pytest.approx(3.0)  # L1


def test_nothing_to_count_gives_zero_with_graph():
    crit = MultiMAECriterion(["s2_rgb", "worldcover"], patch_size=P, weighting="uncertainty")
    pred = torch.randn(B, 3, S, S, requires_grad=True)
    logits = torch.randn(B, 11, 4, 4, requires_grad=True)
    inputs = {"s2_rgb": torch.randn(B, 3, S, S), "worldcover": torch.full((B, S, S), -1)}
    masks = {"s2_rgb": torch.zeros(B, 4), "worldcover": torch.ones(B, 4)}  # nothing masked / all no-data
    out = crit({"s2_rgb": pred, "worldcover": logits}, inputs, masks)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert pred.grad is not None and torch.count_nonzero(pred.grad) == 0


def test_nodata_values_do_not_change_any_loss():
    domains = ["s2_rgb", "elevation", "worldcover", "s2_rgb_normpix"]
    crit = MultiMAECriterion(domains, patch_size=P, losses={"elevation": "l1"}, norm_pix=["s2_rgb_normpix"])
    torch.manual_seed(0)
    preds = {"s2_rgb": torch.randn(B, 3, S, S), "elevation": torch.randn(B, 1, S, S),
             "worldcover": torch.randn(B, 11, 4, 4), "s2_rgb_normpix": torch.randn(B, 3, S, S)}
    inputs = {"s2_rgb": torch.randn(B, 3, S, S), "elevation": torch.randn(B, 1, S, S),
              "worldcover": torch.randint(0, 11, (B, S, S))}
    valid = {k: torch.rand(B, S, S) > 0.3 for k in inputs}
    masks = {d: _mask([1, 0, 1, 1], [1, 1, 0, 1]) for d in domains}
    before = crit(preds, inputs, masks, valid)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["s2_rgb"][~valid["s2_rgb"].unsqueeze(1).expand(-1, 3, -1, -1)] = float("nan")
    changed["elevation"][~valid["elevation"].unsqueeze(1)] = 1e6
    changed["worldcover"][~valid["worldcover"]] = 7
    after = crit(preds, changed, masks, valid)
    for key in before:
        assert torch.isfinite(after[key]) and after[key].item() == pytest.approx(before[key].item()), key


def test_norm_pix_target_is_standardised_per_patch_over_valid_pixels():
    target = torch.randn(B, 3, S, S) * 5 + 2
    valid = torch.rand(B, S, S) > 0.2
    out = norm_pix_target(target, valid, P)
    v = valid[0, :8, :8]
    patch = out[0, :, :8, :8][:, v]  # (3, n valid)
    assert patch.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert patch.flatten().std().item() == pytest.approx(1.0, abs=1e-3)


def test_majority_pool_ignores_nodata_and_breaks_ties_low():
    labels = torch.full((1, 4, 4), -1)
    labels[0, :2, :2] = torch.tensor([[3, 3], [-1, 5]])  # 3 wins
    labels[0, :2, 2:] = torch.tensor([[4, 2], [-1, -1]])  # tie 2 / 4 -> 2
    # bottom-left block all no-data -> -1; bottom-right: 1 beats the no-data majority
    labels[0, 2:, 2:] = torch.tensor([[1, -1], [-1, -1]])
    pooled = majority_pool(labels, 2, num_classes=6)
    assert pooled.tolist() == [[[3, 2], [-1, 1]]]


def test_cross_entropy_uses_pooled_targets_and_ignores_nodata():
    crit = MultiMAECriterion(["worldcover"], patch_size=P)
    labels = torch.randint(0, 11, (B, S, S))
    labels[0] = -1  # sample 0 entirely no-data
    logits = torch.randn(B, 11, 4, 4)
    out = crit({"worldcover": logits}, {"worldcover": labels}, {"worldcover": torch.ones(B, 4)})
    pooled = majority_pool(labels, 4, 11)
    expected = torch.nn.functional.cross_entropy(logits[1:], pooled[1:])
    assert out["worldcover"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_uncertainty_weighting_formula_and_fp32_under_autocast():
    crit = MultiMAECriterion(["s2_rgb", "elevation"], patch_size=P, weighting="uncertainty")
    with torch.no_grad():
        crit.log_vars["s2_rgb"].fill_(0.5)
        crit.log_vars["elevation"].fill_(-1.0)
    preds = {"s2_rgb": torch.randn(B, 3, S, S).bfloat16(), "elevation": torch.randn(B, 1, S, S).bfloat16()}
    inputs = {"s2_rgb": torch.randn(B, 3, S, S), "elevation": torch.randn(B, 1, S, S)}
    masks = {"s2_rgb": torch.ones(B, 4), "elevation": torch.ones(B, 4)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(preds, inputs, masks)
    assert out["loss"].dtype == torch.float32 and out["s2_rgb"].dtype == torch.float32
    expected = (out["s2_rgb"] * torch.exp(torch.tensor(-0.5)) + 0.5
                + out["elevation"] * torch.exp(torch.tensor(1.0)) - 1.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_domain_loss_and_norm_pix_are_the_objectives_settings():
    pred, target = torch.zeros(B, 1, S, S), torch.full((B, 1, S, S), -3.0)
    masks = {"elevation": torch.ones(B, 4)}
    mse = MultiMAECriterion(["elevation"], patch_size=P)({"elevation": pred}, {"elevation": target}, masks)
    l1 = MultiMAECriterion(["elevation"], patch_size=P, losses={"elevation": "l1"})(
        {"elevation": pred}, {"elevation": target}, masks)
    assert mse["elevation"].item() == pytest.approx(9.0) and l1["elevation"].item() == pytest.approx(3.0)
    rgb = torch.randn(B, 3, S, S) * 4 + 7
    ones = {"s2_rgb_normpix": torch.ones(B, 4)}
    plain = MultiMAECriterion(["s2_rgb_normpix"], patch_size=P)(
        {"s2_rgb_normpix": torch.zeros(B, 3, S, S)}, {"s2_rgb": rgb}, ones)
    normed = MultiMAECriterion(["s2_rgb_normpix"], patch_size=P, norm_pix=["s2_rgb_normpix"])(
        {"s2_rgb_normpix": torch.zeros(B, 3, S, S)}, {"s2_rgb": rgb}, ones)
    assert plain["s2_rgb_normpix"].item() == pytest.approx(rgb.square().mean().item(), rel=1e-5)
    assert normed["s2_rgb_normpix"].item() == pytest.approx((191 / 192), rel=1e-4)  # unbiased var: mean sq = (n-1)/n


def test_bad_weighting_and_missing_target_are_named():
    with pytest.raises(ValueError, match="multimae.loss.weighting"):
        MultiMAECriterion(["s2_rgb"], patch_size=P, weighting="gradnorm")
    with pytest.raises(ValueError, match=r"multimae.loss.per_domain.worldcover: a class map uses 'ce'"):
        MultiMAECriterion(["worldcover"], patch_size=P, losses={"worldcover": "mse"})
    with pytest.raises(ValueError, match=r"multimae.loss.per_domain.s2_rgb: expected 'mse' or 'l1'"):
        MultiMAECriterion(["s2_rgb"], patch_size=P, losses={"s2_rgb": "ce"})
    with pytest.raises(ValueError, match=r"multimae.loss.norm_pix: 'elevation' is not a continuous output"):
        MultiMAECriterion(["s2_rgb"], patch_size=P, norm_pix=["elevation"])
    crit = MultiMAECriterion(["s2_rgb_normpix"], patch_size=P)
    with pytest.raises(ValueError, match="s2_rgb_normpix.*s2_rgb"):
        crit({"s2_rgb_normpix": torch.zeros(B, 3, S, S)}, {}, {"s2_rgb_normpix": torch.ones(B, 4)})
