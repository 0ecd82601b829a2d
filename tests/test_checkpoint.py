"""Atomic checkpoints, weights_only loading, RNG round trips and checked loads (utils/checkpoint.py)."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from utils import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")  # half a file on disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]


def test_corrupt_or_missing_checkpoint_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(bad)
    assert ckpt.resume_path("auto", tmp_path) is None
    assert ckpt.resume_path("never", tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="resume"):
        ckpt.resume_path(str(tmp_path / "x.pth"), tmp_path)


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # move off the seeds, cache a gaussian
    path = ckpt.save_checkpoint({"rng": [ckpt.rng_state({"loader": gen})]}, tmp_path / "c.pth")
    expected = (random.random(), np.random.normal(), torch.rand(2), torch.rand(1, generator=gen))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"][0], {"loader": gen})
    got = (random.random(), np.random.normal(), torch.rand(2), torch.rand(1, generator=gen))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_load_state_checked_names_differing_keys():
    small, wide = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 16))
    with pytest.raises(ckpt.CheckpointError, match=r"missing in checkpoint: 1\.weight.*\n.*shape differs: 0\.weight"):
        ckpt.load_state_checked(small, wide.state_dict())
    target = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    ckpt.load_state_checked(target, {k: v for k, v in small.state_dict().items() if k.startswith("0.")},
                            ignore_missing=["1."])
    assert torch.equal(target[0].weight, small[0].weight)


def test_optimizer_state_is_matched_by_parameter_names():
    from utils.optim import build_optimizer, param_groups

    class Net(nn.Module):
        def __init__(self, order):
            super().__init__()
            for name in order:  # the same parameters, registered in another order
                setattr(self, name, nn.Parameter(torch.full((2,), float(ord(name)))))

    optim_cfg = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    src = Net("abc")
    opt = build_optimizer(param_groups(src, 0.0), optim_cfg, lr=0.1)
    for p in src.parameters():
        p.grad = p.detach().clone()
    opt.step()
    saved = opt.state_dict()
    dst = Net("cab")
    opt2 = build_optimizer(param_groups(dst, 0.0), optim_cfg, lr=0.1)
    ckpt.load_optimizer_state(opt2, saved)
    for name in "abc":
        torch.testing.assert_close(opt2.state[getattr(dst, name)]["exp_avg"], opt.state[getattr(src, name)]["exp_avg"])
    other = Net("abd")
    with pytest.raises(ckpt.CheckpointError, match="optimizer state does not match.*missing d"):
        ckpt.load_optimizer_state(build_optimizer(param_groups(other, 0.0), optim_cfg, lr=0.1), saved)


def test_read_checkpoint_checks_version_and_kind(tmp_path):
    ckpt.save_checkpoint({"format_version": 2, "kind": "pretraining"}, tmp_path / "a.pth")
    assert ckpt.read_checkpoint(tmp_path / "a.pth", kind="pretraining")["kind"] == "pretraining"
    with pytest.raises(ckpt.CheckpointError, match=r"a.pth is a 'pretraining' checkpoint, not 'finetuning'"):
        ckpt.read_checkpoint(tmp_path / "a.pth", kind="finetuning")
    ckpt.save_checkpoint({"format_version": 3, "kind": "pretraining"}, tmp_path / "b.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"b.pth: checkpoint format_version 3 is not one this code reads \(1, 2\)"):
        ckpt.read_checkpoint(tmp_path / "b.pth")
    ckpt.save_checkpoint({"weights": torch.ones(1)}, tmp_path / "c.pth")
    with pytest.raises(ckpt.CheckpointError, match="format_version None"):
        ckpt.read_checkpoint(tmp_path / "c.pth")
# ---------------------------------------------------------------- integrity, fallback, locks, resume checks


def _flip_inside_tensor(path, nbytes=4096):
    """Flip ``nbytes`` inside the largest tensor record of a torch zip checkpoint (a silent load before)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    h = info.header_offset  # local header: 30 bytes + name + extra, then the stored bytes
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    for i in range(start + 64, start + 64 + nbytes):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


def test_flipped_bytes_fail_the_crc_check(tmp_path):
    path = ckpt.save_checkpoint({"exp_avg": torch.ones(100_000)}, tmp_path / "checkpoint-last.pth")
    member = _flip_inside_tensor(path)
    garbage = torch.load(path, weights_only=True)["exp_avg"]  # what torch alone loads, silently
    assert not torch.equal(garbage, torch.ones(100_000))
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {path}: damaged, member {member} fails its CRC"):
        ckpt.load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ckpt.CheckpointError, match=rf"cannot read checkpoint {path}: damaged or truncated"):
        ckpt.verify_checkpoint(path)


def _run_folder(tmp_path):
    out = tmp_path / "run"
    for epoch in (1, 2, 3):
        state = {"epoch": epoch, "w": torch.full((50_000,), float(epoch))}
        ckpt.save_checkpoint(state, out / f"checkpoint-epoch{epoch}.pth")
    ckpt.save_checkpoint({"epoch": 4, "w": torch.full((50_000,), 4.0)}, out / "checkpoint-last.pth")
    return out


def test_damaged_last_checkpoint_falls_back_to_the_newest_intact_kept_one(tmp_path, capsys):
    out = _run_folder(tmp_path)
    assert ckpt.resume_path("auto", out) == out / "checkpoint-last.pth"
    _flip_inside_tensor(out / "checkpoint-last.pth")
    _flip_inside_tensor(out / "checkpoint-epoch3.pth")
    path = ckpt.resume_path("auto", out)
    assert path == out / "checkpoint-epoch2.pth" and ckpt.load_checkpoint(path)["epoch"] == 2
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: {out / 'checkpoint-last.pth'} is damaged") and len(warning.splitlines()) == 1
    assert warning.endswith(f"resuming from {out / 'checkpoint-epoch2.pth'} instead")
    (out / "checkpoint-last.pth").unlink()  # no last but kept ones: resume the newest, never start over
    assert ckpt.resume_path("auto", out) == out / "checkpoint-epoch2.pth"
    for name in ("checkpoint-epoch1.pth", "checkpoint-epoch2.pth"):
        (out / name).write_bytes(b"\0" * 100)
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint in .*run to resume from: .*checkpoint-last"
                                                   r".pth: not found; .*epoch3.pth: damaged.*epoch2.pth.*epoch1.pth"):
        ckpt.resume_path("auto", out)


def test_resume_never_refuses_a_folder_that_holds_a_run(tmp_path):
    assert ckpt.resume_path("never", tmp_path / "new") is None
    out = _run_folder(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=rf"'never' but output_dir {out} holds a run \(checkpoint-epoch1"
                                                   r".pth, .*checkpoint-last.pth\).*choose another output_dir"):
        ckpt.resume_path("never", out)


def test_disk_full_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint({"step": 1}, tmp_path / "checkpoint-last.pth")
    real_save = torch.save

    class FullDisk:  # the file torch writes into; the device fills up after 1000 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FullDisk(f)))
    with pytest.raises(ckpt.CheckpointError, match=rf"^no space left on {tmp_path} while writing checkpoint-last.pth; "
                                                   "the previous checkpoint-last.pth is intact$"):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


def test_a_second_writer_during_a_save_never_shares_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    real_save, names = torch.save, []

    def save_while_another_writer_saves(obj, f):
        real_save(obj, f)  # writer A's bytes are in its temporary file, not yet renamed ...
        names.append(Path(f.name).name)
        if obj["who"] == "A":  # ... when writer B saves the same checkpoint from start to end
            ckpt.save_checkpoint({"who": "B"}, path)

    monkeypatch.setattr(torch, "save", save_while_another_writer_saves)
    ckpt.save_checkpoint({"who": "A"}, path)  # a shared "<name>.tmp" made this rename fail
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_checkpoint(path)["who"] == "A"  # the last rename wins, whole
    assert len(set(names)) == 2 and all(n.startswith(f"checkpoint-last.pth.{os.getpid()}-") for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


_HOLD = """import sys, time; sys.path.insert(0, {repo!r})
from utils.checkpoint import lock_output_dir
with lock_output_dir({out!r}):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_locked_output_dir_refuses_a_second_run_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=str(REPO), out=str(out))], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.CheckpointError, match=rf"output_dir {out} is in use by another run: pid {proc.pid} on "
                                                       rf"host {socket.gethostname()}"), ckpt.lock_output_dir(out):
            pass
    finally:
        proc.kill()
        proc.wait()
    # killed holder: the kernel dropped its flock, the next run takes over (and says whose lock it was)
    with ckpt.lock_output_dir(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ckpt.CheckpointError, match=f"pid {os.getpid()}"), ckpt.lock_output_dir(out):
            pass  # a second holder in the same process is refused too
    assert f"taking over the lock of pid {proc.pid}" in capsys.readouterr().err
    with ckpt.lock_output_dir(out):  # released at the end of the block
        pass


def test_lock_without_flock_uses_an_owner_file_and_takes_over_stale_ones(tmp_path, monkeypatch, capsys):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ckpt.fcntl, "flock", no_flock)
    out = tmp_path / "run"
    with ckpt.lock_output_dir(out) as owner:
        assert owner.name == ".lock.owner" and json.loads(owner.read_text())["pid"] == os.getpid()
        with pytest.raises(ckpt.CheckpointError, match=f"in use by another run: pid {os.getpid()}"), \
                ckpt.lock_output_dir(out):
            pass
    assert not (out / ".lock.owner").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (out / ".lock.owner").write_text(json.dumps({"pid": dead.pid, "host": host, "command": "x"}))
    with ckpt.lock_output_dir(out):
        assert json.loads((out / ".lock.owner").read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {dead.pid}" in capsys.readouterr().err
    (out / ".lock.owner").write_text(json.dumps({"pid": dead.pid, "host": "another-node", "command": "x"}))
    with pytest.raises(ckpt.CheckpointError, match=f"pid {dead.pid} on host another-node"), ckpt.lock_output_dir(out):
        pass  # another host's lock: its liveness cannot be checked from here


class _Data:
    def __init__(self, stats_mean, rows):
        self.stats_mean, self.rows_digest = stats_mean, str(rows)

    def domain_info(self):
        return {"s2_rgb": {"bands": ["B04", "B03", "B02"], "normalization": "band_stats",
                           "stats": {"sentinel2_l2a": {"mean": self.stats_mean, "std": [1.0, 1.0, 1.0]}}}}


def test_resume_with_other_data_statistics_splits_or_steps_is_refused(tmp_path):
    saved = ckpt.data_fingerprint(_Data([1.0, 2.0, 3.0], [0, 1, 2]), steps_per_epoch=10)
    path = tmp_path / "checkpoint-last.pth"
    assert ckpt.check_resume_data(saved, ckpt.data_fingerprint(_Data([1.0, 2.0, 3.0], [0, 1, 2]), 10), path) == []
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-last.pth was trained on other data than this run "
                                                   r"reads: domain s2_rgb: band statistics sentinel2_l2a.mean "
                                                   r"\[1.0, 2.0, 3.0\] -> \[1.0, 2.5, 3.0\].*resume_anyway=true"):
        ckpt.check_resume_data(saved, ckpt.data_fingerprint(_Data([1.0, 2.5, 3.0], [0, 1, 2]), 10), path)
    other = ckpt.data_fingerprint(_Data([1.0, 2.0, 3.0], [0, 1]), 9)
    with pytest.raises(ckpt.CheckpointError, match=r"training split rows differ .*; steps per epoch 10 -> 9"):
        ckpt.check_resume_data(saved, other, path)
    diffs = ckpt.check_resume_data(saved, other, path, resume_anyway=True)
    assert len(diffs) == 2
    older = {k: v for k, v in saved.items() if k != "split_digest"}  # a checkpoint without the entry
    assert ckpt.check_resume_data(older, {**other, "steps_per_epoch": 10}, path) == []
