"""MultiMAE pretraining on an MMEarth file set, single process or ``torchrun``, CPU or GPU.

    python run_pretraining.py --config cfgs/pretrain/demo.yaml data_path=DATA output_dir=OUT
    torchrun --nproc_per_node=4 run_pretraining.py --config cfgs/pretrain/default.yaml data_path=DATA
    python run_pretraining.py --config cfgs/pretrain/default.yaml --summary

Running the same command again resumes from ``<output_dir>/checkpoint-last.pth`` and continues the
same trajectory (RNG states of every rank, the sampler position and the schedule are restored).
Every key and its default: ``cfgs/defaults.yaml``. This script only wires the shared pieces:
``utils.config`` / ``utils.dist`` (set-up), ``utils.data.mmearth`` (data), ``multimae.build``
(model and losses), ``utils.optim`` / ``utils.engine`` (optimisation), ``utils.checkpoint``,
``utils.logger`` and ``utils.visualize``; what it owns is the pretraining step and the loop.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate

from multimae.build import build_criterion, build_multimae, model_summary
from utils import checkpoint as ckpt
from utils.config import (build_arg_parser, check_output_dir, config_from_args, effective_lr, save_config,
                          total_batch_size, user_errors)
from utils.data.mmearth import MMEarthDataset
from utils.dist import DistInfo, all_gather_object, cleanup, init_distributed, seed_everything
from utils.engine import build_engine, evaluate
from utils.logger import RunLogger, truncate_log
from utils.optim import build_optimizer, cosine_lr, param_groups, set_lr
from utils.sampler import make_loader
from utils.visualize import save_reconstructions

CHECKPOINT_KIND = "multimae_pretraining"


class PretrainTask(nn.Module):
    """Model plus criterion as one module, so DDP syncs both (the criterion may hold loss weights).

    ``forward(batch)`` returns ``{"loss": total, "loss_<domain>": per-domain loss}`` (fp32 scalars).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def no_weight_decay(self) -> set[str]:
        """The model's no-decay parameter names, prefixed as this module names them."""
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Masked forward and losses of a batch (docs/DESIGN.md batch contract); ``generator`` seeds the masks."""
        preds, masks = self.model(batch["inputs"], valid=batch["valid"], generator=generator)
        losses = self.criterion(preds, batch["inputs"], masks, batch["valid"])
        return {"loss": losses["loss"], **{f"loss_{d}": v for d, v in losses.items() if d != "loss"}}


@dataclass
class Progress:
    """Where the run stands: ``step`` optimizer steps done, ``epoch`` current epoch, ``epoch_step``
    steps done within it."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def build_datasets(cfg: dict) -> tuple[MMEarthDataset, MMEarthDataset | None]:
    """Training and validation datasets (``data.val_split`` '' or absent from the splits file -> None).

    Raises:
        ValueError: ``data_path`` is not set. Dataset errors name the missing file, split or domain.
    """
    if not cfg["data_path"]:
        raise ValueError("config key 'data_path' is not set: pass data_path=<MMEarth .h5 or folder>")
    data = cfg["data"]
    domains = list(dict.fromkeys(cfg["in_domains"] + cfg["out_domains"]))
    common = dict(input_size=data["input_size"], resize=data["resize"], elevation_norm=data["elevation_norm"],
                  seed=cfg["seed"])
    train = MMEarthDataset(cfg["data_path"], domains, data["train_split"], augment=True, hflip=data["hflip"], **common)
    val = None
    if data["val_split"] and data["val_split"] in train.split_names:
        val = MMEarthDataset(cfg["data_path"], domains, data["val_split"], augment=False, **common)
    return train, val


class Trainer:
    """The pretraining loop: epochs of optimizer steps, validation, pictures, checkpoints, logs."""

    def __init__(self, cfg: dict, info: DistInfo) -> None:
        self.cfg, self.info, self.out = cfg, info, Path(cfg["output_dir"])
        seed_everything(cfg["seed"] + info.rank)
        self.train_set, self.val_set = build_datasets(cfg)
        self.loader, self.loader_gen = make_loader(self.train_set, cfg, info, train=True)
        self.val_loader = make_loader(self.val_set, cfg, info, train=False)[0] if self.val_set else None
        per_rank = len(self.loader.sampler) // cfg["batch_size"]
        self.steps_per_epoch = per_rank // cfg["accum_steps"]
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"split {cfg['data']['train_split']!r} of {cfg['data_path']} has {len(self.train_set)} samples: fewer "
                f"than one optimizer step needs (batch_size x accum_steps x world_size = "
                f"{total_batch_size(cfg, info.world_size)})"
            )
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        self.warmup_steps = round(cfg["optim"]["warmup_epochs"] * self.steps_per_epoch)
        self.lr = effective_lr(cfg, info.world_size)
        self.task = PretrainTask(build_multimae(cfg), build_criterion(cfg)).to(info.device)
        optim = cfg["optim"]
        groups = param_groups(self.task, optim["weight_decay"], decay_everything=optim["decay_everything"])
        optimizer = build_optimizer(groups, optim, self.lr)
        if cfg["compile"]:
            self.task.model.compile()  # in place: state-dict keys stay free of torch.compile's prefix
        # Every adapter and decoder takes part in every step, so DDP needs no find_unused_parameters.
        self.engine = build_engine(self.task, optimizer, cfg, info)
        self.progress = Progress()

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """The checkpoint dict (docs/DESIGN.md); gathers every rank's RNG state, so all ranks call it."""
        rngs = all_gather_object(ckpt.rng_state({"loader": self.loader_gen}))
        p = self.progress
        sampler = {**self.loader.sampler.state_dict(), "epoch": p.epoch, "start": self._samples_done()}
        return {
            "model": self.task.model.state_dict(), "criterion": self.task.criterion.state_dict(),
            **self.engine.state_dict(),
            "step": p.step, "epoch": p.epoch, "epoch_step": p.epoch_step, "rng": rngs,
            "sampler": sampler,
            "config": self.cfg, "domains": self.train_set.domain_info(), "kind": CHECKPOINT_KIND,
        }

    def save(self, *names: str) -> None:
        """Write the checkpoint atomically under each of ``names`` in ``output_dir`` (rank 0; all ranks call)."""
        state = self.state()
        if self.info.is_main:
            for name in names:
                ckpt.save_checkpoint(state, self.out / name)

    def resume(self, path: Path, log: RunLogger) -> None:
        """Restore model, criterion, optimizer, scaler, schedule position and RNG states from ``path``."""
        state = ckpt.load_checkpoint(path, kind=CHECKPOINT_KIND)
        ckpt.load_state_checked(self.task.model, state["model"], what=f"model ({path})")
        ckpt.load_state_checked(self.task.criterion, state["criterion"], what=f"criterion ({path})")
        self.engine.load_state_dict(state)
        self.progress = Progress(state["step"], state["epoch"], state["epoch_step"])
        if self.info.is_main:  # records after the checkpoint are repeated by this run
            truncate_log(self.out / "log.jsonl", self.progress.step)
        if len(state["rng"]) == self.info.world_size:
            ckpt.set_rng_state(state["rng"][self.info.rank], {"loader": self.loader_gen})
        else:
            log.write(f"resume: checkpoint has RNG states of {len(state['rng'])} ranks, this run "
                      f"{self.info.world_size}: the run continues but not on the identical trajectory")
        log.write(f"resumed from {path} at step {self.progress.step} (epoch {self.progress.epoch})")

    # ------------------------------------------------------------------ loop
    def finished(self) -> bool:
        """True once ``epochs`` are done or ``max_steps`` optimizer steps are reached."""
        cap = self.cfg["max_steps"]
        return self.progress.epoch >= self.cfg["epochs"] or (cap is not None and self.progress.step >= cap)

    def _samples_done(self) -> int:
        """Samples this rank has consumed in the current epoch (the sampler's resume position)."""
        return self.progress.epoch_step * self.cfg["accum_steps"] * self.cfg["batch_size"]

    def _start_epoch(self):
        p, cfg = self.progress, self.cfg
        self.train_set.set_epoch(p.epoch)
        self.loader.sampler.set_epoch(p.epoch, start=self._samples_done())
        self.loader_gen.manual_seed(cfg["seed"] * 100_003 + p.epoch * 1_009 + self.info.rank)
        return iter(self.loader)

    def train(self, log: RunLogger) -> dict:
        """Run until ``epochs`` or ``max_steps``; returns the last logged record."""
        cfg, p = self.cfg, self.progress
        samples_per_step = total_batch_size(cfg, self.info.world_size)
        last, t0, n0 = {}, time.perf_counter(), p.step
        while not self.finished():
            batches = self._start_epoch()
            while p.epoch_step < self.steps_per_epoch and not self.finished():
                micro = [next(batches) for _ in range(cfg["accum_steps"])]
                lr = cosine_lr(p.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, base_lr=self.lr,
                               min_lr=cfg["optim"]["min_lr"])
                set_lr(self.engine.optimizer, lr)
                out = self.engine.train_step(self.task_step, micro)
                p.step, p.epoch_step = p.step + 1, p.epoch_step + 1
                if p.step % cfg["log_every_steps"] == 0 or p.step == 1:
                    rate = (p.step - n0) * samples_per_step / max(time.perf_counter() - t0, 1e-9)
                    last = {"step": p.step, "epoch": round(p.epoch + p.epoch_step / self.steps_per_epoch, 4),
                            **out.values, "lr": lr, "grad_norm": out.grad_norm, "samples_per_s": rate,
                            "skipped_steps": self.engine.nonfinite_total}
                    log.log(last)
                    log.advance(p.step, {"loss": out.values["loss"], "lr": lr, "samples/s": rate})
                    t0, n0 = time.perf_counter(), p.step
                if p.step % cfg["save_every_steps"] == 0:
                    self.save("checkpoint-last.pth")
            del batches  # shut the workers down before validation starts its own
            if p.epoch_step == self.steps_per_epoch:
                self._end_epoch(log)
                t0 = time.perf_counter()  # samples/s counts training only
            elif p.step % cfg["save_every_steps"] != 0:
                self.save("checkpoint-last.pth")  # stopped mid-epoch by max_steps
        self.pictures(log, f"step{p.step:06d}")
        return last

    def _end_epoch(self, log: RunLogger) -> None:
        cfg, p = self.cfg, self.progress
        p.epoch, p.epoch_step = p.epoch + 1, 0
        if self.val_loader is not None:
            with torch.random.fork_rng(devices=[self.info.device] if self.info.device.type == "cuda" else []):
                gen = torch.Generator(self.info.device).manual_seed(cfg["seed"])
                values = evaluate(self.engine, lambda b: self.task(b, generator=gen), self.val_loader)
            log.log({"step": p.step, "epoch": p.epoch, **{f"val_{k}": v for k, v in values.items()}})
            log.write(f"epoch {p.epoch}: val loss {values.get('loss', float('nan')):.4f}")
        every = cfg["vis"]["every_epochs"]
        if every and p.epoch % every == 0 and not self.finished():
            self.pictures(log, f"step{p.step:06d}")
        names = ["checkpoint-last.pth"]
        if p.epoch % cfg["keep_every_epochs"] == 0 or p.epoch == cfg["epochs"]:
            names.append(f"checkpoint-epoch{p.epoch}.pth")
        self.save(*names)

    def task_step(self, batch: dict) -> dict:
        """One forward pass of the (possibly DDP-wrapped) task: ``{"loss", "loss_<domain>"}``."""
        return self.engine.model(batch)

    @torch.no_grad()
    def pictures(self, log: RunLogger, tag: str) -> None:
        """Reconstructions of ``vis.num_samples`` validation (else training) samples, rank 0.

        The samples are spread evenly over the split (neighbouring rows are often neighbouring tiles, or
        the L1C and L2A tiles of one place), and are the same ones at every call.
        """
        if not self.info.is_main:
            return
        dataset = self.val_set or self.train_set
        n = min(self.cfg["vis"]["num_samples"], len(dataset))
        rows = sorted({round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)})
        batch = self.engine.to_device(default_collate([dataset[i] for i in rows]))
        model = self.task.model
        model.eval()
        with torch.random.fork_rng(devices=[self.info.device] if self.info.device.type == "cuda" else []):
            gen = torch.Generator(self.info.device).manual_seed(self.cfg["seed"])
            preds, masks = model(batch["inputs"], valid=batch["valid"], generator=gen)
        model.train()
        paths = save_reconstructions(self.out / "reconstructions", tag, batch["inputs"], batch["valid"], preds, masks,
                                     patch_size=self.cfg["model"]["patch_size"], num_samples=len(rows))
        log.log_images(self.progress.step, paths)


def main(cfg: dict) -> dict:
    """Pretrain with the resolved config ``cfg``; resume from ``<output_dir>/checkpoint-last.pth`` if present.

    Returns:
        The last logged training record (empty when the run was already complete).

    Raises:
        ConfigError: ``output_dir`` holds another run's config (unless ``resume_anyway``).
        NonFiniteLossError: ``max_nonfinite_steps`` consecutive non-finite losses.
        CheckpointError: the resume checkpoint is unreadable or from another model shape.
    """
    info = init_distributed(cfg["device"])
    try:
        out = Path(cfg["output_dir"])
        check_output_dir(cfg, out)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
        trainer = Trainer(cfg, info)
        resume = ckpt.resume_path(cfg["resume"], out)
        if info.is_main:
            save_config(cfg, out)
        log = RunLogger(out, enabled=info.is_main, total_steps=trainer.total_steps if cfg["max_steps"] is None
                        else min(cfg["max_steps"], trainer.total_steps), wandb_cfg=cfg["wandb"], config=cfg,
                        world_size=info.world_size)
        try:
            if resume is not None:
                trainer.resume(resume, log)
                log.start_at(trainer.progress.step)
            if trainer.finished():
                log.write(f"{out}: run already complete at step {trainer.progress.step}; nothing to do")
                return {}
            log.write(f"pretraining: {len(trainer.train_set)} training samples, {trainer.steps_per_epoch} steps/epoch, "
                      f"lr {trainer.lr:.3g}, world size {info.world_size}, device {info.device}, "
                      f"precision {trainer.engine.precision}")
            return trainer.train(log)
        finally:
            log.close()
    finally:
        cleanup()


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``--config FILE [--summary] key=value ...``."""
    args = build_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = config_from_args(args)
    if args.summary:
        print(model_summary(cfg))
        return
    main(cfg)


if __name__ == "__main__":
    with user_errors():
        cli(sys.argv[1:])
