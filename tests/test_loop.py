"""The shared training loop (utils/loop.py): schedule guard, after-step hook, cadence and resume of both run kinds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import run_finetuning
from tests.test_finetune import write_pretraining_checkpoint
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.dist import DistInfo
from utils.engine import build_engine
from utils.logger import read_log
from utils.loop import LoopTask, TrainLoop, schedule
from utils.optim import build_optimizer, param_groups
from utils.sampler import make_loader

INFO = DistInfo(0, 0, 1, torch.device("cpu"))


def test_warmup_longer_than_the_run_is_clipped_with_a_warning():
    cfg = load_config(None, ["epochs=5", "optim.warmup_epochs=5"])
    total, warmup, warning = schedule(cfg, steps_per_epoch=20)
    assert (total, warmup) == (100, 10)
    assert "optim.warmup_epochs=5.0 covers the whole run (epochs=5, 100 steps): warm-up clipped to 10 steps" in warning
    assert schedule(load_config(None, ["epochs=5", "optim.warmup_epochs=1.5"]), 20) == (100, 30, None)


class _Points(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i), 1.0]), "y": torch.tensor([2.0 * i])}


class _ToyTask(LoopTask):
    """Linear regression; a NaN loss at the optimizer steps in ``nan_at`` (1-based)."""

    kind = "pretraining"

    def __init__(self, cfg, nan_at=()):
        torch.manual_seed(0)
        self.train_set = _Points()
        self.train_loader, self.train_gen = make_loader(self.train_set, cfg, INFO, train=True)
        self.net = nn.Linear(2, 1)
        opt = build_optimizer(param_groups(self.net, 0.0), cfg["optim"], 0.01)
        self.engine = build_engine(self.net, opt, cfg, INFO)
        self.nan_at, self.hooked = set(nan_at), []

    def step(self, batch):
        loss = (self.engine.model(batch["x"]) - batch["y"]).square().mean()
        if self.loop.progress.step + 1 in self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss}

    def after_step(self, step, total_steps):
        self.hooked.append((step, total_steps))

    def state(self):
        return {"net": self.net.state_dict()}

    def load_state(self, state, path):
        self.net.load_state_dict(state["net"])


def _toy_cfg(out, *extra):
    return load_config(None, [f"output_dir={out}", "epochs=2", "batch_size=4", "num_workers=0", "log_every_steps=3",
                              "save_every_steps=5", "keep_every_epochs=1", "data.pin_memory=false", *extra])


def test_after_step_hook_skips_nonfinite_steps_and_cadence_holds(tmp_path):
    cfg = _toy_cfg(tmp_path)
    task = _ToyTask(cfg, nan_at={3})
    loop = TrainLoop(cfg, INFO, task, tmp_path)
    log = loop.logger()
    loop.run(log)
    log.close()
    assert [s for s, _ in task.hooked] == [1, 2, 4, 5, 6, 7, 8] and task.hooked[0][1] == 8
    records = read_log(tmp_path / "log.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 3, 6]  # step 1, then every log_every_steps
    assert records[[r["step"] for r in records].index(3)]["skipped_steps"] == 1
    epochs = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pth")) == [
        "checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "checkpoint-last.pth"]
    state = load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert state["format_version"] == 2 and state["step"] == 8 and state["steps_per_epoch"] == 4


FT = ["num_workers=0", "batch_size=2", "data.input_size=16", "data.pin_memory=false", "optim.blr=0.05",
      "optim.warmup_epochs=0.0", "epochs=2", "log_every_steps=1", "save_every_steps=3", "in_domains=[s2_rgb, s1]"]


def test_finetuning_logs_per_step_and_resumes_mid_epoch_on_the_same_trajectory(mmearth_fileset, tmp_path):
    pre = tmp_path / "pre.pth"
    write_pretraining_checkpoint(pre)
    common = [f"data_path={mmearth_fileset}", f"finetune.checkpoint={pre}", *FT]
    full, split = tmp_path / "full", tmp_path / "split"
    run_finetuning.main(load_config(None, [*common, f"output_dir={full}"]))
    run_finetuning.main(load_config(None, [*common, f"output_dir={split}", "max_steps=3"]))  # stops mid-epoch 1
    assert load_checkpoint(split / "checkpoint-last.pth")["epoch_step"] == 3
    run_finetuning.main(load_config(None, [*common, f"output_dir={split}"]))

    def losses(out):
        return {r["step"]: r["loss"] for r in read_log(Path(out) / "log.jsonl") if "loss" in r}

    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))  # 4 steps per epoch, one record per step
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


class _SignalledTask(_ToyTask):
    """Sends itself ``signum`` during optimizer step ``at`` (1-based), as SLURM or torchrun would."""

    def __init__(self, cfg, at, signum):
        super().__init__(cfg)
        self.at, self.signum = at, signum

    def step(self, batch):
        if self.loop.progress.step + 1 == self.at:
            import os

            os.kill(os.getpid(), self.signum)
        return super().step(batch)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_finishes_the_step_writes_the_checkpoint_and_resumes_on_the_trajectory(tmp_path, signame):
    import signal

    from utils.loop import PREEMPTED_EXIT_CODE, Preempted

    full, cut = tmp_path / "full", tmp_path / "cut"
    for out in (full, cut):
        out.mkdir()
    cfg_full, cfg_cut = _toy_cfg(full, "save_every_steps=100"), _toy_cfg(cut, "save_every_steps=100")
    loop = TrainLoop(cfg_full, INFO, _ToyTask(cfg_full), full)
    log = loop.logger()
    loop.run(log)
    log.close()
    previous = signal.getsignal(getattr(signal, signame))
    loop = TrainLoop(cfg_cut, INFO, _SignalledTask(cfg_cut, at=3, signum=getattr(signal, signame)), cut)
    log = loop.logger()
    with pytest.raises(Preempted) as stopped:
        loop.run(log)
    log.close()
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 75 and f"stopped by {signame} at step 3" in stopped.value.message
    assert signal.getsignal(getattr(signal, signame)) == previous  # handlers restored
    assert load_checkpoint(cut / "checkpoint-last.pth")["step"] == 3
    loop = TrainLoop(cfg_cut, INFO, _ToyTask(cfg_cut), cut)  # the same command again
    log = loop.logger()
    loop.run(log)
    log.close()

    def losses(out):
        return {r["step"]: r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r}

    assert losses(cut) == losses(full) and sorted(losses(full)) == [1, 3, 6]
    record = read_log(full / "log.jsonl")[0]
    assert 0.0 <= record["data_wait_fraction"] <= 1.0 and record["peak_mem_mb"] > 10
