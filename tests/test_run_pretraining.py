"""End-to-end pretraining on the tiny MMEarth fixture (run_pretraining.py): smoke run, exact resume,
refusals and bad input. Tiny model: dim 32, depth 2, 16 px input, 4 tokens per domain."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_pretraining
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import ConfigError, load_config
from utils.logger import read_log

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "epochs=3", "batch_size=4", "num_workers=0", "log_every_steps=1", "save_every_steps=1000",
    "in_domains=[s2_rgb, elevation, worldcover]", "multimae.out_domains=[s2_rgb, elevation, worldcover, s2_rgb_normpix]",
    "data.input_size=16", "model.preset={dim: 32, depth: 2, heads: 2}", "multimae.decoder.dim=32",
    "multimae.decoder.depth=1", "multimae.decoder.heads=2", "model.class_embed_dim=8",
    "multimae.masking.num_encoded_tokens=4",
    "optim.blr=1e-2", "optim.warmup_epochs=0.5", "vis.every_epochs=0", "vis.num_samples=2",
]


def tiny_cfg(fileset, out, *extra):
    return load_config(None, [f"data_path={fileset}", f"output_dir={out}", *TINY, *extra])


def losses(out):
    return {r["step"]: r["loss"] for r in read_log(Path(out) / "log.jsonl") if "loss" in r}


def test_two_step_smoke_run(mmearth_fileset, tmp_path):
    out = tmp_path / "run"
    last = run_pretraining.main(tiny_cfg(mmearth_fileset, out, "max_steps=2"))
    assert last["step"] == 2 and torch.isfinite(torch.tensor(last["loss"]))
    records = read_log(out / "log.jsonl")
    assert records[0]["world_size"] == 1
    assert {"step", "epoch", "loss", "loss_s2_rgb", "loss_elevation", "loss_worldcover", "loss_s2_rgb_normpix", "lr",
            "grad_norm", "samples_per_s"} <= set(records[0])
    assert any("val_loss" in r for r in records)  # epoch 1 ended at step 2
    state = load_checkpoint(out / "checkpoint-last.pth")  # weights_only=True
    assert state["format_version"] == 2 and state["kind"] == "pretraining" and state["step"] == 2
    assert state["epoch"] == 1 and state["config"]["max_steps"] == 2 and len(state["rng"]) == 1
    enc = state["encoder"]
    assert enc["spec"]["in_domains"] == ["s2_rgb", "elevation", "worldcover"] and enc["spec"]["dim"] == 32
    assert enc["domains"]["s2_rgb"]["bands"] == ["B04", "B03", "B02"] and "stats" in enc["domains"]["s2_rgb"]
    assert [s["domain"] for s in enc["layout"]["segments"]] == enc["spec"]["in_domains"]
    assert "blocks.1.attn.qkv.weight" in enc["state_dict"]
    assert state["objective"]["name"] == "multimae" and "decoders.s2_rgb.head.weight" in state["objective"]["state_dict"]
    assert (out / "config.yaml").is_file() and sorted(p.name for p in (out / "reconstructions").iterdir())
    assert run_pretraining.main(tiny_cfg(mmearth_fileset, out, "max_steps=2")) == {}  # complete: exits at once


def test_resume_continues_the_same_trajectory(mmearth_fileset, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run_pretraining.main(tiny_cfg(mmearth_fileset, full, "max_steps=5"))
    run_pretraining.main(tiny_cfg(mmearth_fileset, split, "max_steps=3"))  # stops mid-epoch 2
    run_pretraining.main(tiny_cfg(mmearth_fileset, split, "max_steps=5"))
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert len(set(a.values())) == 5  # the loss really changes step to step


def test_refuses_another_runs_output_dir_and_other_model_shapes(mmearth_fileset, tmp_path):
    out = tmp_path / "run"
    run_pretraining.main(tiny_cfg(mmearth_fileset, out, "max_steps=1"))
    with pytest.raises(ConfigError, match=r"another run.*optim\.blr"):
        run_pretraining.main(tiny_cfg(mmearth_fileset, out, "max_steps=2", "optim.blr=1e-3"))
    with pytest.raises(CheckpointError, match=r"(?s)multimae model.*shape differs: .*encoder\.blocks"):
        run_pretraining.main(tiny_cfg(mmearth_fileset, out, "max_steps=2", "model.preset={dim: 64, depth: 2, heads: 2}",
                                      "resume_anyway=true"))


def test_bad_input_names_the_problem(mmearth_fileset, tmp_path):
    with pytest.raises(ValueError, match="data_path"):
        run_pretraining.main(load_config(None, [f"output_dir={tmp_path}", *TINY]))
    with pytest.raises(KeyError, match="canopy_height_eth.*missing"):
        broken = tmp_path / "data"
        shutil.copytree(mmearth_fileset, broken)
        import h5py

        with h5py.File(next(broken.glob("*.h5")), "a") as h5:
            del h5["canopy_height_eth"]
        run_pretraining.main(tiny_cfg(broken, tmp_path / "o", "in_domains=[s2_rgb, canopy_height]",
                                      "multimae.out_domains=[s2_rgb]"))


def test_summary_flag_prints_without_data(capsys):
    run_pretraining.cli(["--config", str(REPO / "cfgs/pretrain/demo.yaml"), "--summary"])
    text = capsys.readouterr().out
    assert "tokens_per_domain" in text and "dynamic_world" in text


def _spawn_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def two_gloo_ranks(args: list[str], out: Path) -> tuple[dict, dict]:
    """Pretrain with ``args`` (config items) for 3 steps of batch 2 in 2 torchrun processes (gloo) into ``out``;
    check the log, and return the two ranks' final objective state dicts (tests/run_pretraining_ddp_worker.py)."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(REPO / "tests" / "run_pretraining_ddp_worker.py"), *args, f"output_dir={out}",
                    "batch_size=2", "max_steps=3"],
                   check=True, env=_spawn_env(), cwd=REPO, timeout=300)
    records = read_log(out / "log.jsonl")
    assert records[0]["world_size"] == 2 and max(r["step"] for r in records) == 3
    return torch.load(out / "params_rank0.pth"), torch.load(out / "params_rank1.pth")


@pytest.mark.slow
def test_two_process_gloo_ranks_hold_identical_parameters(mmearth_fileset, tmp_path):
    out = tmp_path / "ddp"
    p0, p1 = two_gloo_ranks([f"data_path={mmearth_fileset}", *TINY], out)
    assert p0.keys() == p1.keys()
    for k in p0:
        torch.testing.assert_close(p0[k], p1[k], rtol=0, atol=0, msg=k)
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def kill_9_then_resume(command, full: Path, killed: Path, kill_after_step: int = 3):
    """Run ``command(full)`` to its end; start ``command(killed)``, kill -9 its process group (DataLoader workers
    included) once step ``kill_after_step`` is logged, then run it again (it resumes from its last checkpoint).

    Returns:
        The per-step losses of both runs and the step of the checkpoint the killed run resumed from.
    """
    import signal
    import time

    subprocess.run(command(full), check=True, env=_spawn_env(), cwd=REPO, timeout=300, capture_output=True)
    proc = subprocess.Popen(command(killed), env=_spawn_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and max(losses(killed), default=0) < kill_after_step and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = load_checkpoint(killed / "checkpoint-last.pth")["step"]
    subprocess.run(command(killed), check=True, env=_spawn_env(), cwd=REPO, timeout=300, capture_output=True)
    return losses(full), losses(killed), resumed_from


@pytest.mark.slow
def test_kill_9_with_workers_then_resume_matches_uninterrupted(mmearth_fileset, tmp_path):
    def command(out):
        return [sys.executable, str(REPO / "run_pretraining.py"), f"data_path={mmearth_fileset}", f"output_dir={out}",
                *TINY, "num_workers=2", "epochs=4", "save_every_steps=2"]

    a, b, resumed_from = kill_9_then_resume(command, tmp_path / "full", tmp_path / "killed")
    assert resumed_from < 8  # killed before the end
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_no_decay_groups_of_the_real_model(mmearth_fileset):
    from multimae.build import build_pretraining
    from utils.optim import param_groups

    cfg = tiny_cfg(mmearth_fileset, "unused")
    model = build_pretraining(cfg)
    groups = param_groups(model, 0.05)
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert "encoder.global_tokens" in exempt and all(n.endswith("weight") for n in decayed)
    assert not any(".norm" in n or n.endswith(".bias") or "class_embed" in n for n in decayed)
    assert not any("mask_token" in n or "domain_embeds" in n for n in decayed)
    assert any(n.startswith("encoder.blocks.0.") for n in decayed)
    assert len(exempt) + len(decayed) == len(list(model.parameters()))


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_exits_75_and_the_rerun_matches_uninterrupted(mmearth_fileset, tmp_path):
    import signal
    import time

    def command(out):
        return [sys.executable, str(REPO / "run_pretraining.py"), f"data_path={mmearth_fileset}", f"output_dir={out}",
                *TINY, "num_workers=2", "epochs=4", "save_every_steps=100"]

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    subprocess.run(command(full), check=True, env=_spawn_env(), cwd=REPO, timeout=300, capture_output=True)
    proc = subprocess.Popen(command(stopped), env=_spawn_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and max(losses(stopped), default=0) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what SLURM / torchrun send before stopping a job
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, printed
    assert "stopped by SIGTERM" in printed
    assert 3 <= load_checkpoint(stopped / "checkpoint-last.pth")["step"] < 8
    subprocess.run(command(stopped), check=True, env=_spawn_env(), cwd=REPO, timeout=300, capture_output=True)
    a, b = losses(full), losses(stopped)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_a_locked_output_dir_and_changed_data_refuse_the_run(mmearth_fileset, tmp_path):
    from utils.checkpoint import lock_output_dir

    out = tmp_path / "run"
    with lock_output_dir(out):  # another run holds the folder
        with pytest.raises(CheckpointError, match=rf"pid {os.getpid()}"):
            run_pretraining.main(tiny_cfg(mmearth_fileset, out, "max_steps=1"))
    data = tmp_path / "data"
    shutil.copytree(mmearth_fileset, data)
    run_pretraining.main(tiny_cfg(data, out, "max_steps=1"))
    stats_file = next(data.glob("*_band_stats.json"))
    import json

    stats = json.loads(stats_file.read_text())
    stats["sentinel2_l1c"]["mean"][3] += 100.0  # B04, part of s2_rgb: the file set's statistics changed
    stats_file.write_text(json.dumps(stats))
    with pytest.raises(CheckpointError, match=r"(?s)s2_rgb.*resume_anyway"):
        run_pretraining.main(tiny_cfg(data, out, "max_steps=2"))
    assert run_pretraining.main(tiny_cfg(data, out, "max_steps=2", "resume_anyway=true"))["step"] == 2
