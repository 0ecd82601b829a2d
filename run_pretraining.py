"""Pretraining of the multi-modal encoder with a chosen objective on an MMEarth file set, single process or torchrun.

    python run_pretraining.py --config cfgs/pretrain/demo.yaml data_path=DATA output_dir=OUT
    torchrun --nproc_per_node=4 run_pretraining.py --config cfgs/pretrain/default.yaml data_path=DATA
    python run_pretraining.py --config cfgs/pretrain/default.yaml --summary

``objective`` names the recipe (``multimae``: MultiMAE-EO; the registry is ``multimae/objectives``), its
section of the config sets it. Running the same command again resumes from ``<output_dir>/checkpoint-last.pth``
and continues the same trajectory. Every key and its default: ``cfgs/defaults.yaml``. This script wires the
shared pieces: ``utils.config`` / ``utils.dist`` (set-up), ``utils.data.mmearth`` (data), ``multimae.build``
(encoder and objective), ``utils.optim`` / ``utils.engine`` (optimisation), ``utils.loop`` (the training loop,
checkpoints, resume), ``utils.logger`` and ``utils.visualize``; what it owns is the pretraining task: its data,
validation and pictures.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.utils.data import default_collate

from multimae.build import build_pretraining, data_domains, model_summary
from utils import checkpoint as ckpt
from utils.config import build_arg_parser, check_output_dir, config_from_args, effective_lr, save_config, user_errors
from utils.data.mmearth import MMEarthDataset
from utils.dist import DistInfo, cleanup, init_distributed, seed_everything
from utils.engine import build_engine, evaluate
from utils.logger import RunLogger
from utils.loop import LoopTask, TrainLoop
from utils.optim import build_optimizer, param_groups
from utils.sampler import make_loader
from utils.visualize import save_pictures


def build_datasets(cfg: dict) -> tuple[MMEarthDataset, MMEarthDataset | None]:
    """Training and validation datasets (``data.val_split`` '' or absent from the splits file -> None).

    Every sample carries the domains the objective needs (:func:`multimae.build.data_domains`) and the
    encoder's metadata fields (``model.metadata``); the objective's worker-side batch transform, if it has one,
    is attached by :class:`PretrainTask`.

    Raises:
        ValueError: ``data_path`` is not set. Dataset errors name the missing file, split or domain.
    """
    if not cfg["data_path"]:
        raise ValueError("config key 'data_path' is not set: pass data_path=<MMEarth .h5 or folder>")
    data = cfg["data"]
    domains = data_domains(cfg)
    common = dict(input_size=data["input_size"], resize=data["resize"], elevation_norm=data["elevation_norm"],
                  seed=cfg["seed"], max_bad_rows=data["max_bad_rows"], metadata=cfg["model"]["metadata"])
    train = MMEarthDataset(cfg["data_path"], domains, data["train_split"], augment=True, hflip=data["hflip"], **common)
    val = None
    if data["val_split"] and data["val_split"] in train.split_names:
        val = MMEarthDataset(cfg["data_path"], domains, data["val_split"], augment=False, **common)
    return train, val


class PretrainTask(LoopTask):
    """The pretraining run's part of the loop: data, the objective and its engine, validation, pictures.

    Args:
        cfg: The resolved config.
        info: This process's rank, world size and device.
        out: Output folder.
    """

    kind = "pretraining"

    def __init__(self, cfg: dict, info: DistInfo, out: Path) -> None:
        self.cfg, self.info, self.out = cfg, info, out
        seed_everything(cfg["seed"] + info.rank)
        self.train_set, self.val_set = build_datasets(cfg)
        self.train_loader, self.train_gen = make_loader(self.train_set, cfg, info, train=True)
        self.val_loader = make_loader(self.val_set, cfg, info, train=False)[0] if self.val_set else None
        self.objective = build_pretraining(cfg).to(info.device)
        transform = self.objective.batch_transform()
        for ds in (self.train_set, self.val_set):
            if ds is not None:
                ds.batch_transform = transform
        optim = cfg["optim"]
        groups = param_groups(self.objective, optim["weight_decay"], decay_everything=optim["decay_everything"])
        optimizer = build_optimizer(groups, optim, effective_lr(cfg, info.world_size))
        if cfg["compile"]:
            self.objective.encoder.compile()  # in place: state-dict keys stay free of torch.compile's prefix
        self.engine = build_engine(self.objective, optimizer, cfg, info)

    def describe(self) -> str:
        """The start line: objective and training samples."""
        return f"pretraining {self.objective.name}: {len(self.train_set)} training samples"

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One forward pass of the (possibly DDP-wrapped) objective: ``{"loss", "loss_<term>"}``."""
        out = self.engine.model(batch)
        return {"loss": out["loss"], **{f"loss_{k}": v for k, v in out.items() if k != "loss"}}

    def after_step(self, step: int, total_steps: int) -> None:
        """The objective's hook (EMA teachers) after a step that was not skipped."""
        self.objective.after_step(step, total_steps)

    def state(self) -> dict:
        """``encoder`` (architecture, domains with their statistics, weights) and ``objective`` entries."""
        return {"encoder": ckpt.encoder_entry(self.objective.encoder, self.train_set.domain_info()),
                "objective": self.objective.objective_state()}

    def load_state(self, state: dict, path: Path) -> None:
        """Load the encoder and objective weights (exact key check) and the objective's extra state."""
        if state["objective"]["name"] != self.objective.name:
            raise ckpt.CheckpointError(f"{path} was pretrained with objective {state['objective']['name']!r}, "
                                       f"this config trains {self.objective.name!r}")
        weights = {**{f"encoder.{k}": v for k, v in state["encoder"]["state_dict"].items()},
                   **state["objective"]["state_dict"]}
        ckpt.load_state_checked(self.objective, weights, what=f"{self.objective.name} model ({path})")
        self.objective.load_extra_state(state["objective"])

    def end_epoch(self, epoch: int, last: bool, log: RunLogger) -> tuple[dict, list[str]]:
        """Validation losses (masks drawn from a generator seeded with ``seed``) and, every
        ``vis.every_epochs``, pictures."""
        entries = {}
        if self.val_loader is not None:
            with self._fixed_rng() as gen:
                values = evaluate(self.engine, lambda b: self.step_unwrapped(b, gen), self.val_loader)
            entries = {f"val_{k}": v for k, v in values.items()}
            log.write(f"epoch {epoch}: val loss {values.get('loss', float('nan')):.4f}")
        every = self.cfg["vis"]["every_epochs"]
        if every and epoch % every == 0 and not last:
            self.pictures(log)
        return entries, []

    def step_unwrapped(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """:meth:`step` on the objective itself (no DDP: ranks may hold different numbers of batches)."""
        out = self.objective(batch, generator=generator)
        return {"loss": out["loss"], **{f"loss_{k}": v for k, v in out.items() if k != "loss"}}

    @contextlib.contextmanager
    def _fixed_rng(self):
        """A generator seeded with ``seed`` on the device, inside a fork of the global RNG (left untouched)."""
        device = self.info.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield torch.Generator(device).manual_seed(self.cfg["seed"])

    def finish(self, log: RunLogger) -> None:
        """Pictures at the end of the run."""
        self.pictures(log)

    @torch.no_grad()
    def pictures(self, log: RunLogger) -> None:
        """The objective's pictures of ``vis.num_samples`` validation (else training) samples, rank 0.

        The samples are spread evenly over the split (neighbouring rows are often neighbouring tiles, or the
        L1C and L2A tiles of one place), and are the same ones at every call.
        """
        if not self.info.is_main:
            return
        dataset = self.val_set or self.train_set
        n = min(self.cfg["vis"]["num_samples"], len(dataset))
        rows = sorted({round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)})
        batch = self.engine.to_device(default_collate(dataset.__getitems__(rows)))
        self.objective.eval()
        with self._fixed_rng() as gen:
            data = self.objective.pictures(batch, generator=gen)
        self.objective.train()
        if data is None:
            return
        step = self.loop.progress.step
        paths = save_pictures(self.out, f"step{step:06d}", data)
        log.log_images(step, paths)


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
        with ckpt.lock_output_dir(out) if info.is_main else contextlib.nullcontext():  # one run per folder
            check_output_dir(cfg, out)
            if info.device.type == "cuda":
                torch.backends.cudnn.benchmark = True
                torch.backends.cuda.matmul.allow_tf32 = True
            loop = TrainLoop(cfg, info, PretrainTask(cfg, info, out), out)
            if info.is_main:
                save_config(cfg, out)
            log = loop.logger()
            try:
                return loop.run(log)
            finally:
                log.close()
    finally:
        cleanup()


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``--config FILE [--config FILE ...] [--summary] key=value ...``."""
    args = build_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = config_from_args(args)
    if args.summary:
        print(model_summary(cfg))
        return
    main(cfg)


if __name__ == "__main__":
    with user_errors():
        cli(sys.argv[1:])
