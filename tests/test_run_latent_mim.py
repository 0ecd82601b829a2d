"""run_pretraining.py with the latent_mim objective on the tiny MMEarth fixture (smoke run, exact resume, kill -9
with workers), its checkpoint fine-tuned and probed by run_finetuning.py, and the demo config on the real sample.
Tiny model: dim 32, depth 2, 16 px input, 4 tokens per band set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_finetuning
import run_pretraining
from tests.geobench_fixture import write_geobench_task
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.logger import read_log

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "objective=latent_mim", "epochs=3", "batch_size=4", "num_workers=0", "log_every_steps=1", "save_every_steps=1000",
    "in_domains=[s2_10m, s2_20m, s1]", "latent_mim.decode_only=[elevation, worldcover]", "data.input_size=16",
    "model.preset={dim: 32, depth: 2, heads: 2}", "model.class_embed_dim=8", "latent_mim.predictor.dim=32",
    "latent_mim.predictor.depth=1", "latent_mim.predictor.heads=2", "optim.blr=1e-2", "optim.warmup_epochs=0.5",
    "optim.clip_grad=1.0", "vis.every_epochs=0", "vis.num_samples=2",
]
FT = ["num_workers=0", "batch_size=4", "data.input_size=16", "data.pin_memory=false", "optim.blr=0.05",
      "optim.warmup_epochs=0.0"]


def tiny_cfg(fileset, out, *extra):
    return load_config(None, [f"data_path={fileset}", f"output_dir={out}", *TINY, *extra])


def records(out):
    return [r for r in read_log(Path(out) / "log.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def latent_checkpoint(mmearth_fileset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latent") / "run"
    run_pretraining.main(tiny_cfg(mmearth_fileset, out, "max_steps=2"))
    return out


def test_smoke_run_logs_every_term_and_writes_checkpoint_and_pictures(latent_checkpoint):
    out = latent_checkpoint
    first = records(out)[0]
    assert {"loss", "loss_patch_disc", "loss_infonce", "loss_patch_disc_s2_10m", "loss_patch_disc_worldcover"} <= set(first)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(out))
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert state["step"] == 2 and state["objective"]["name"] == "latent_mim"
    assert state["encoder"]["spec"]["in_domains"] == ["s2_10m", "s2_20m", "s1"]
    assert not any(k.startswith("target") for k in state["encoder"]["state_dict"])
    assert "target.input_adapters.worldcover.class_embed.weight" in state["objective"]["state_dict"]
    assert sorted(p.name for p in (out / "latent").iterdir())  # the pictures of the end of the run


def test_resume_continues_the_same_trajectory(mmearth_fileset, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run_pretraining.main(tiny_cfg(mmearth_fileset, full, "max_steps=5"))
    run_pretraining.main(tiny_cfg(mmearth_fileset, split, "max_steps=3"))  # stops mid-epoch 2
    run_pretraining.main(tiny_cfg(mmearth_fileset, split, "max_steps=5"))
    a = {r["step"]: r for r in records(full)}
    b = {r["step"]: r for r in records(split)}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        for key in ("loss", "loss_patch_disc", "loss_infonce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert len({r["loss"] for r in a.values()}) == 5
    ta = load_checkpoint(full / "checkpoint-last.pth")["objective"]["state_dict"]
    tb = load_checkpoint(split / "checkpoint-last.pth")["objective"]["state_dict"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith("target."))


def test_checkpoint_fine_tunes_and_probes_like_a_multimae_one(mmearth_fileset, latent_checkpoint, tmp_path):
    ckpt = latent_checkpoint / "checkpoint-last.pth"
    seg = run_finetuning.main(load_config(None, [
        f"data_path={mmearth_fileset}", f"output_dir={tmp_path / 'seg'}", *FT, "epochs=1",
        f"finetune.checkpoint={ckpt}", "in_domains=[s2_10m, s2_20m, s1]", "finetune.head=convnext"]))
    assert 0.0 <= seg["metrics"]["test"]["miou"] <= 1.0 and seg["new_domains"] == []
    write_geobench_task(tmp_path / "gb", "m-eurosat", num_samples=18)
    for protocol in ("knn", "linear_probe"):
        cfg = load_config([REPO / "cfgs/finetune/geobench.yaml", REPO / "cfgs/finetune/geobench/m-eurosat.yaml"], [
            f"data_path={tmp_path / 'gb'}", f"output_dir={tmp_path / protocol}", *FT, "epochs=2",
            f"finetune.protocol={protocol}", f"finetune.checkpoint={ckpt}", "in_domains=[s2_10m, s2_20m]"])
        res = run_finetuning.main(cfg)
        assert 0.0 <= res["metrics"]["test"]["accuracy"] <= 1.0 and res["new_domains"] == []


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.mark.slow
def test_kill_9_with_workers_then_resume_matches_uninterrupted(mmearth_fileset, tmp_path):
    def command(out):
        return [sys.executable, str(REPO / "run_pretraining.py"), f"data_path={mmearth_fileset}", f"output_dir={out}",
                *TINY, "num_workers=2", "epochs=4", "save_every_steps=2"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(command(full), check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True)
    proc = subprocess.Popen(command(killed), env=_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and max(
            (r["step"] for r in records(killed)) if (killed / "log.jsonl").is_file() else [0], default=0) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run, its DataLoader workers included
    proc.wait()
    assert load_checkpoint(killed / "checkpoint-last.pth")["step"] < 8  # killed before the end
    subprocess.run(command(killed), check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True)
    a = {r["step"]: r for r in records(full)}
    b = {r["step"]: r for r in records(killed)}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key in ("loss", "loss_patch_disc", "loss_infonce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)


@pytest.mark.slow
def test_demo_config_on_the_real_sample_learns(shared_data_dir, tmp_path):
    src = shared_data_dir / "terramesh_examples"
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    data = tmp_path / "terramesh64"
    subprocess.run([sys.executable, str(REPO / "tools/geotiff_to_mmearth.py"), "--spec",
                    str(REPO / "cfgs/data/terramesh_examples.yaml"), "--src", str(src), "--out", str(data),
                    "--tile-size", "64"], check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True)
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(REPO / "run_pretraining.py"), "--config",
                    str(REPO / "cfgs/pretrain/latent_mim_demo.yaml"), f"data_path={data}", f"output_dir={out}"],
                   check=True, env=_env(), cwd=REPO, timeout=1800, capture_output=True)
    rs = records(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rs) and len(rs) == max(r["step"] for r in rs)
    disc = [r["loss_patch_disc"] for r in rs]
    first, last = sum(disc[:10]) / 10, sum(disc[-10:]) / 10
    assert last < first - 0.1, (first, last)
