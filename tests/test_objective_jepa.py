"""The JEPA objective (multimae/objectives/jepa.py, jepa_masks.py): block masks, EMA teacher, MIL-NCE, patch scales,
collapse watch, bad input, and end-to-end runs (resume after kill -9 and two DDP ranks are slow tests)."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

import run_finetuning
import run_pretraining
from multimae.build import build_encoder, build_pretraining
from multimae.objectives.jepa import JEPAObjective, ema_momentum, mil_nce
from multimae.objectives.jepa_masks import block_size, draw_blocks, modality_keep
from tests.multimae_fixture import DEFAULTS, random_batch
from tests.test_run_pretraining import kill_9_then_resume, two_gloo_ranks
from utils.checkpoint import encoder_entry, load_checkpoint
from utils.config import load_config
from utils.data.mmearth import MMEarthDataset
from utils.logger import read_log
from utils.optim import param_groups
from utils.sampler import ResumableDistributedSampler

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["s2_rgb", "elevation", "worldcover"]
TINY = [
    "objective=jepa", "epochs=3", "batch_size=4", "num_workers=0", "log_every_steps=1", "save_every_steps=1000",
    f"in_domains=[{', '.join(DOMAINS)}]", "data.input_size=16", "model.preset={dim: 32, depth: 2, heads: 2}",
    "model.class_embed_dim=8", "jepa.patch_sizes=[4, 8]", "jepa.predictor.depth=1", "optim.blr=1e-2",
    "optim.warmup_epochs=0.5", "vis.every_epochs=0", "vis.num_samples=2",
]


def jepa_cfg(input_size: int = 32, patch_sizes=(4, 8, 16), domains=("s2_rgb", "s1", "elevation", "worldcover")) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    cfg["objective"] = "jepa"
    cfg["in_domains"] = list(domains)
    cfg["data"]["input_size"] = input_size
    cfg["model"].update(preset={"dim": 32, "depth": 2, "heads": 2}, class_embed_dim=8)
    cfg["jepa"]["patch_sizes"] = list(patch_sizes)
    cfg["jepa"]["predictor"]["depth"] = 1
    return cfg


def samples_of(inputs, valid):
    b = next(iter(inputs.values())).shape[0]
    return [{"inputs": {k: v[i] for k, v in inputs.items()}, "valid": {k: v[i] for k, v in valid.items()}, "index": i}
            for i in range(b)]


def masked_batch(model, cfg, batch_size=3, seed=0, invalid=True):
    inputs, valid = random_batch(cfg, batch_size, seed=seed, invalid=invalid)
    seeds = (np.arange(batch_size, dtype=np.uint64) * np.uint64(7919) + np.uint64(seed))
    return default_collate(model.batch_transform()(samples_of(inputs, valid), seeds))


# ---------------------------------------------------------------------------------------------- masks
def _rectangle(positions: np.ndarray, width: int) -> tuple[int, int]:
    """(h, w) of the rectangle ``positions`` fill exactly (fails otherwise)."""
    rows, cols = positions // width, positions % width
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert positions.size == h * w == np.unique(positions).size
    return int(h), int(w)


def test_block_masks_keep_targets_out_of_the_context_with_sizes_and_aspect_in_range():
    grid = (32, 32)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        target = block_size(rng, grid, (0.2, 0.8), (0.75, 1.5), leave_margin=True)
        context = block_size(rng, grid, (0.85, 1.0), (1.0, 1.0), leave_margin=False)
        # Sides are sqrt(s H W a) and sqrt(s H W / a) rounded (target sides clipped to 31): some scale and
        # aspect in range must give them.
        (h, w), top = target, math.inf
        h_hi, w_hi = (h + 0.5 if h < 31 else top), (w + 0.5 if w < 31 else top)
        assert (h - 0.5) * (w - 0.5) / 1024 <= 0.8 and h_hi * w_hi / 1024 >= 0.2
        assert (h - 0.5) / w_hi <= 1.5 and h_hi / (w - 0.5) >= 0.75
        assert h <= 31 and w <= 31  # a target block never covers a whole side
        (hc, wc) = context
        assert hc == wc and 0.85 <= (hc + 0.5) ** 2 / 1024 and (hc - 0.5) ** 2 / 1024 <= 1.0 and hc <= 32
        ctx, targets = draw_blocks(rng, grid, target, context, num_targets=4, min_context=1)
        assert targets.shape == (4, target[0] * target[1])
        for block in targets:
            assert _rectangle(block, 32) == target
        assert ctx.size >= 1 and np.all(np.diff(ctx) > 0)
        assert not np.intersect1d(ctx, targets).size  # targets removed from the context
        rows, cols = ctx // 32, ctx % 32  # the context lies inside one context-sized block
        assert rows.max() - rows.min() < context[0] and cols.max() - cols.min() < context[1]


def test_masks_share_positions_across_modalities_anchor_one_valid_modality_and_keep_the_ratio():
    token_valid = np.ones((4, 50), dtype=bool)
    token_valid[:, 0] = [False, False, True, False]  # position 0: only modality 2 has data
    token_valid[1, 10:20] = False
    keep = modality_keep(np.random.default_rng(0), token_valid, 0.5)
    assert keep[2, 0] and keep[:, 0].sum() >= 1 and not (keep & ~token_valid).any()
    assert keep.any(axis=0).all()  # every context position shows at least one modality
    # 50 anchors + int(150 * 0.5) of the other tokens, all valid (137 of the 150 are).
    assert keep.sum() == 50 + 75
    assert modality_keep(np.random.default_rng(0), np.ones((3, 8), bool), 1.0).sum(axis=0).tolist() == [1] * 8
    assert modality_keep(np.random.default_rng(0), np.ones((3, 8), bool), 0.0).all()

    cfg = jepa_cfg()
    model = build_pretraining(cfg)
    batch = masked_batch(model, cfg, 4)
    jm = batch["jepa"]
    b, c = jm["context"].shape
    assert jm["keep"].shape == (b, 4, c) and jm["targets"].shape[:2] == (b, 4)
    assert (jm["patch_size"] == jm["patch_size"][0]).all()  # one scale per batch
    # The student sees, for every modality, the tokens at the same context positions of its own segment.
    p = int(jm["patch_size"][0])
    tok = model.encoder.tokenize(batch["inputs"], batch["valid"], patch_size=p)
    seen = {}
    blocks = model.encoder.forward_blocks
    model.encoder.forward_blocks = lambda x: (seen.update(x=x), blocks(x))[1]
    model(batch)
    x = seen["x"].view(b, 4, c, -1)
    for m, seg in enumerate(tok.layout.segments):
        ids = seg.start + jm["context"]  # (B, C)
        real = torch.stack([tok.tokens[i, ids[i]] for i in range(b)])
        masked = torch.stack([(tok.tokens - tok.patch_embeds)[i, ids[i]] for i in range(b)]) + model.mask_token[0]
        shown = jm["keep"][:, m] & torch.stack([tok.valid[i, ids[i]] for i in range(b)])
        assert shown.any() and (~shown).any()
        torch.testing.assert_close(x[:, m][shown], real[shown])
        torch.testing.assert_close(x[:, m][~shown], masked[~shown])


def _fixture_loader(fileset, transform, num_workers, start=0):
    ds = MMEarthDataset(fileset, DOMAINS, "train", input_size=16, augment=True, seed=3, batch_transform=transform)
    ds.set_epoch(1)
    sampler = ResumableDistributedSampler(ds, shuffle=True, seed=3)
    sampler.set_epoch(1, start=start)
    return DataLoader(ds, batch_size=2, sampler=sampler, num_workers=num_workers, drop_last=True)


def test_masks_are_the_same_for_any_worker_count_and_after_a_mid_epoch_resume(mmearth_fileset):
    cfg = load_config(None, TINY)
    transform = build_pretraining(cfg).batch_transform()
    runs = {w: [b["jepa"] for b in _fixture_loader(mmearth_fileset, transform, w)] for w in (0, 2)}
    resumed = [b["jepa"] for b in _fixture_loader(mmearth_fileset, transform, 0, start=2)]
    assert len(runs[0]) >= 3
    for a, b in zip(runs[0], runs[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(runs[0][1:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert {int(m["patch_size"][0]) for m in runs[0]} <= {4, 8}


# ---------------------------------------------------------------------------------------------- teacher
def test_ema_update_equals_the_formula_and_the_teacher_gets_no_gradient():
    torch.manual_seed(0)
    cfg = jepa_cfg()
    model = build_pretraining(cfg)
    for name, p in model.teacher.named_parameters():  # the teacher starts as an exact copy
        torch.testing.assert_close(p, dict(model.encoder.named_parameters())[name], rtol=0, atol=0)
    batch = masked_batch(model, cfg, 3)
    out = model(batch)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("teacher."))
    groups = param_groups(model, 0.05)
    assert not any(n.startswith("teacher.") for g in groups for n in g["names"])
    assert "teacher.blocks.0.attn.qkv.weight" in model.objective_state()["state_dict"]  # exact resume
    assert not any("teacher" in k for k in encoder_entry(model.encoder)["state_dict"])  # fine-tuning never sees it

    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = {n: p.clone() for n, p in model.encoder.named_parameters()}
    model.after_step(5, 20)
    m = 0.996 + (1.0 - 0.996) * 5 / 20
    assert ema_momentum(5, 20, (0.996, 1.0)) == pytest.approx(m) and ema_momentum(20, 20, (0.996, 1.0)) == 1.0
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * student[name], rtol=0, atol=1e-6)
    model.after_step(20, 20)  # momentum 1 at the end: the teacher stays
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * student[name], rtol=0, atol=1e-6)


def test_a_skipped_step_does_not_move_the_teacher(mmearth_fileset, tmp_path, monkeypatch):
    calls, records = {"n": 0}, []
    forward, after_step = JEPAObjective.forward, JEPAObjective.after_step

    def nan_on_second(self, batch, generator=None):
        out = forward(self, batch, generator)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:
                out["loss"] = out["loss"] * float("nan")
        return out

    def recording(self, step, total):
        before = {n: p.detach().clone() for n, p in self.teacher.named_parameters()}
        student = {n: p.detach().clone() for n, p in self.encoder.named_parameters()}
        after_step(self, step, total)
        after = {n: p.detach().clone() for n, p in self.teacher.named_parameters()}
        records.append((step, total, before, student, after))

    monkeypatch.setattr(JEPAObjective, "forward", nan_on_second)
    monkeypatch.setattr(JEPAObjective, "after_step", recording)
    run_pretraining.main(load_config(None, [f"data_path={mmearth_fileset}", f"output_dir={tmp_path}", *TINY,
                                            "max_steps=3"]))
    assert [r[0] for r in records] == [1, 3]  # step 2 was skipped: no EMA update
    log = read_log(tmp_path / "log.jsonl")
    assert next(r for r in log if r.get("step") == 2 and "loss" in r)["skipped_steps"] == 1
    (_, total, _, _, after1), (_, _, before3, student3, after3) = records
    for name in after1:
        torch.testing.assert_close(before3[name], after1[name], rtol=0, atol=0)  # untouched by step 2
        m = ema_momentum(3, total, (0.996, 1.0))
        torch.testing.assert_close(after3[name], m * before3[name] + (1 - m) * student3[name], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- losses
def test_mil_nce_equals_a_hand_computed_value_and_ignores_invalid_tokens():
    tau = 0.1
    # B = 2 samples, M = 2 modalities, N = 1 position, D = 2. Sample 0: both modalities e1 (cosine 1);
    # sample 1: e2 and -e2 (cosine -1); across samples the cosines are 0.
    tokens = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]]], [[[0.0, 3.0]], [[0.0, -1.0]]]])
    # Anchors of sample 0: candidates {positive 1, 0, 0}; of sample 1: {positive -1, 0, 0}.
    per_anchor_0 = math.log(math.exp(1 / tau) + 2) - 1 / tau
    per_anchor_1 = math.log(math.exp(-1 / tau) + 2) + 1 / tau
    expected = (2 * per_anchor_0 + 2 * per_anchor_1) / 4
    assert mil_nce(tokens, None, tau).item() == pytest.approx(expected, rel=1e-5)
    # A second position whose tokens are invalid changes nothing, whatever they hold.
    extra = torch.cat([tokens, torch.full((2, 2, 1, 2), 7.0)], dim=2)
    valid = torch.tensor([[[True, False], [True, False]], [[True, False], [True, False]]])
    assert mil_nce(extra, valid, tau).item() == pytest.approx(expected, rel=1e-5)
    # Sample 1's second token invalid: its first token has no positive and is no anchor, but stays a candidate
    # of sample 0's anchors (temperature 0.5 keeps the value away from float32 cancellation).
    valid3 = torch.tensor([[[True], [True]], [[True], [False]]])
    only0 = math.log(math.exp(1 / 0.5) + 1) - 1 / 0.5  # candidates: the positive (cosine 1) and e2 (cosine 0)
    assert mil_nce(tokens, valid3, 0.5).item() == pytest.approx(only0, rel=1e-5)


def test_forward_returns_every_term_and_combines_them_with_the_weights():
    torch.manual_seed(0)
    cfg = jepa_cfg()
    cfg["jepa"]["loss"].update(latent_weight=0.5, contrastive_weight=2.0)
    model = build_pretraining(cfg)
    out = model(masked_batch(model, cfg, 3))
    assert set(out) == {"loss", "latent", "contrastive", "target_std", "pred_cos"}
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], 0.5 * out["latent"] + 2.0 * out["contrastive"])
    assert out["latent"] > 0 and out["contrastive"] > 0 and 0 < out["target_std"] and -1 <= out["pred_cos"] <= 1


def test_the_collapse_watch_warns_once_when_the_targets_lose_their_spread():
    torch.manual_seed(0)
    cfg = jepa_cfg()
    model = build_pretraining(cfg)
    batch = masked_batch(model, cfg, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(batch)
        model.after_step(1, 10)  # healthy targets: no warning
    real_encode = model.teacher.encode

    def collapsed(inputs, *, valid=None, patch_size=None):  # a collapsed teacher: every token the same
        out = real_encode(inputs, valid=valid, patch_size=patch_size)
        return torch.arange(out.shape[-1], dtype=out.dtype).expand_as(out).clone()

    model.teacher.encode = collapsed
    out = model(batch)
    assert out["target_std"] < 0.1
    with pytest.warns(RuntimeWarning, match="collapse watch.*jepa.collapse_floor"):
        model.after_step(2, 10)
    assert model.extra_state() == {"collapse_warned": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(batch)
        model.after_step(3, 10)  # once per run


# ---------------------------------------------------------------------------------------------- patch scales
def test_the_same_encoder_weights_run_at_every_listed_scale():
    torch.manual_seed(0)
    cfg = jepa_cfg(input_size=32)
    enc = build_encoder(cfg)
    keys = {k: v.clone() for k, v in enc.state_dict().items()}
    inputs, valid = random_batch(cfg, 2)
    for p in (4, 8, 16):
        out = enc.encode(inputs, valid=valid, patch_size=p)
        assert out.shape == (2, 4 * (32 // p) ** 2 + 1, 32) and torch.isfinite(out).all()
        layout = enc.layout(32, p)
        assert layout.tokens_per_domain == [(32 // p) ** 2] * 4 and layout.segments[0].patch_size == p
    assert enc.state_dict().keys() == keys.keys() and all(torch.equal(enc.state_dict()[k], keys[k]) for k in keys)
    # Ground positions: a 16 px patch sits at the centre of the four 8 px patches it covers.
    c8, c16 = enc.layout(32, 8).coords()[:16].view(4, 4, 2), enc.layout(32, 16).coords()[:4].view(2, 2, 2)
    torch.testing.assert_close(c16, c8.view(2, 2, 2, 2, 2).mean(dim=(1, 3)))
    # FlexiViT's pseudo-inverse resize: a 16 px patch made by resizing an 8 px patch (bilinear) gets the 8 px
    # patch's embedding.
    x = inputs["s2_rgb"]  # (2, 3, 32, 32): 4 x 4 patches of 8 px
    patches = x.view(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 8, 8)
    big = F.interpolate(patches, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    big = big.view(2, 4, 4, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 64, 64)
    adapter = enc.input_adapters["s2_rgb"]
    torch.testing.assert_close(adapter.embed(big, 16)[0], adapter.embed(x)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'worldcover': patch size 2 px is not divisible by its label_downsample 4"):
        enc.tokenize(inputs, valid, patch_size=2)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, message", [
    ({"masking": {"target_scale": [0.2, 1.0]}},
     r"jepa\.masking\.target_scale: .* block as large as the grid would leave no context"),
    ({"patch_sizes": [4, 12]}, r"jepa\.patch_sizes: 12 px does not divide data\.input_size 32"),
    ({"patch_sizes": [2]}, r"jepa\.patch_sizes: 2 px is not divisible by the label_downsample 4 of class map"),
    ({"patch_sizes": [32]}, r"jepa\.patch_sizes: 32 px gives a 1 x 1 grid"),
    ({"ema": {"momentum": [0.996, 1.2]}}, r"jepa\.ema\.momentum: expected \[start, end\], both in \[0, 1\]"),
    ({"masking": {"modality_ratio": 1.5}}, r"jepa\.masking\.modality_ratio"),
])
def test_bad_settings_name_their_key(change, message):
    cfg = jepa_cfg()
    for key, value in change.items():
        if isinstance(value, dict):
            cfg["jepa"][key].update(value)
        else:
            cfg["jepa"][key] = value
    with pytest.raises(ValueError, match=message):
        build_pretraining(cfg)


def test_bad_encoder_settings_and_impossible_masks_are_refused():
    cfg = jepa_cfg()
    cfg["model"]["patch_sizes"] = {"s1": 16}
    with pytest.raises(ValueError, match=r"model\.patch_sizes: the jepa objective tokenizes every domain on one"):
        build_pretraining(cfg)
    with pytest.raises(ValueError, match=r"jepa\.loss\.contrastive_weight: MIL-NCE needs at least 2 in_domains"):
        build_pretraining(jepa_cfg(domains=["s2_rgb"]))
    cfg = jepa_cfg(patch_sizes=[16])
    cfg["jepa"]["masking"]["min_context"] = 4  # 4 positions of a 2 x 2 grid: every target block takes one
    model = build_pretraining(cfg)
    with pytest.raises(ValueError, match=r"jepa\.masking: 4 target blocks of 1 x 1 on a 2 x 2 patch grid left fewer "
                                         r"than min_context=4"):
        masked_batch(model, cfg, 2)
    with pytest.raises(ValueError, match="batch has no 'jepa' masks"):
        inputs, valid = random_batch(cfg, 2)
        model({"inputs": inputs, "valid": valid})


# ---------------------------------------------------------------------------------------------- end to end
def test_pretraining_run_then_its_checkpoint_fine_tunes_and_probes(mmearth_fileset, tmp_path):
    out = tmp_path / "pre"
    last = run_pretraining.main(load_config(None, [f"data_path={mmearth_fileset}", f"output_dir={out}", *TINY,
                                                   "max_steps=2"]))
    assert {"loss_latent", "loss_contrastive", "loss_target_std", "loss_pred_cos"} <= set(last)
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert state["objective"]["name"] == "jepa" and state["objective"]["collapse_warned"] is False
    assert any(k.startswith("teacher.") for k in state["objective"]["state_dict"])
    ft = ["num_workers=0", "batch_size=4", "data.input_size=16", "data.pin_memory=false", "epochs=1", "max_steps=1",
          "in_domains=[s2_rgb, elevation]", f"finetune.checkpoint={out / 'checkpoint-last.pth'}",
          "finetune.target=worldcover", "finetune.head=linear"]
    for protocol in ("finetune", "linear_probe"):
        args = [f"data_path={mmearth_fileset}", f"output_dir={tmp_path / protocol}", *ft,
                f"finetune.protocol={protocol}"]
        res = run_finetuning.main(load_config(None, args))
        assert res["new_domains"] == [] and 0.0 <= res["metrics"]["test"]["miou"] <= 1.0


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_teacher_included(mmearth_fileset, tmp_path):
    def command(out):
        return [sys.executable, str(REPO / "run_pretraining.py"), f"data_path={mmearth_fileset}", f"output_dir={out}",
                *TINY, "num_workers=2", "epochs=4", "save_every_steps=2"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    a, b, resumed_from = kill_9_then_resume(command, full, killed)
    assert resumed_from < 8
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    sa = load_checkpoint(full / "checkpoint-last.pth")["objective"]["state_dict"]
    sb = load_checkpoint(killed / "checkpoint-last.pth")["objective"]["state_dict"]
    teacher = [k for k in sa if k.startswith("teacher.")]
    assert teacher and sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_two_gloo_ranks_hold_the_same_teacher(mmearth_fileset, tmp_path):
    p0, p1 = two_gloo_ranks([f"data_path={mmearth_fileset}", *TINY], tmp_path / "ddp")
    teacher = [k for k in p0 if k.startswith("teacher.")]
    assert teacher and p0.keys() == p1.keys()
    for k in p0:
        torch.testing.assert_close(p0[k], p1[k], rtol=0, atol=0, msg=k)
    moved = [k for k in teacher if not torch.equal(p0[k], p0["encoder." + k[len("teacher."):]])]
    assert moved  # the teacher trails the student: the EMA ran on both ranks
