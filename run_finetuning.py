"""MultiMAE fine-tuning, linear probing, kNN and logistic-regression probes on classification, multi-label and
segmentation tasks.

    python run_finetuning.py --config cfgs/finetune/demo.yaml data_path=DATA finetune.checkpoint=CKPT output_dir=OUT
    python run_finetuning.py --config cfgs/finetune/geobench.yaml --config cfgs/finetune/geobench/m-eurosat.yaml \
        data_path=GEO_BENCH finetune.checkpoint=CKPT
    torchrun --nproc_per_node=4 run_finetuning.py --config cfgs/finetune/geobench.yaml \
        --config cfgs/finetune/geobench/m-bigearthnet.yaml ...

Protocols (``finetune.protocol``): ``finetune`` (whole model, AdamW, layer-wise lr decay on the pretrained
parameters, no weight decay on norms and biases), ``linear_probe`` (frozen encoder; BatchNorm without affine and
one linear layer, on pooled tokens or, for segmentation, on every token of the grid, upsampled; SGD or LARS with
momentum at ``finetune.probe_blr``, as MAE's linear probe), ``knn`` (frozen encoder, k = 20 cosine neighbours)
and ``logistic`` (frozen encoder, scikit-learn logistic regression on pooled embeddings cached in
``<output_dir>/embeddings.npz``, C chosen on the validation split). ``finetune.label_fraction`` applies to every
protocol (the kNN memory bank, the logistic fit, the majority baseline); ``num_train`` in results.json is the
number of labelled samples used. Every trained run writes ``<output_dir>/param_groups.json`` (per optimiser group:
parameter names, lr scale, peak lr, weight decay); a probe of a classification task draws a t-SNE map of the
evaluation embeddings into ``<output_dir>/embedding_maps/``.
``finetune.checkpoint: null`` trains from scratch (a baseline). ``finetune.grid`` (a list of ``in_domains``
lists) fine-tunes the same checkpoint once per input subset into ``<output_dir>/grid/<i>_<domains>/`` and
writes one table, with the score of the majority-class baseline. Results: ``<output_dir>/results.json``
``{"metrics": {"val": {...}, "test": {...}}, ...}`` (class names where the data has them); the best epoch by the
validation metric is kept in ``checkpoint-best.pth`` and evaluated on test at the end. Re-running a command
resumes from ``checkpoint-last.pth``. Every key: ``cfgs/defaults.yaml``; several ``--config`` files merge in order.

The encoder comes from the checkpoint's ``encoder`` entry whatever objective pretrained it
(``finetune.from_scratch=true`` builds the same architecture without the weights); ``finetune.task`` is what
the dataset is (``utils.data.registry``). Shared with ``run_pretraining.py``: config, torchrun set-up, loaders,
optimiser groups and schedule, the engine and the training loop with its checkpoints and resume
(``utils.loop``); what this script owns is the fine-tuning task: its step, evaluation, the pretrained-weight
load (``utils.finetune``) and the grid.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from utils import checkpoint as ckpt
from utils.config import (build_arg_parser, check_output_dir, config_from_args, effective_lr, save_config,
                          total_batch_size, user_errors)
from utils.data.registry import get_dataset_kind
from utils.dist import DistInfo, all_gather_object, broadcast_object, cleanup, init_distributed, seed_everything
from utils.engine import autocast, build_engine
from utils.finetune import (FineTuneModel, build_backbone, build_head, default_layer_decay, fit_logistic, knn_scores,
                            label_fraction_indices, new_parameter_prefixes, read_pretraining_checkpoint)
from utils.logger import RunLogger
from utils.loop import LoopTask, TrainLoop
from utils.metrics import DEFAULT_METRIC, TaskMetrics, class_names_or_ids, format_table
from utils.optim import build_optimizer, build_probe_optimizer, describe_param_groups, param_groups
from utils.sampler import make_loader
from utils.visualize import save_pictures

PROTOCOLS = ("finetune", "linear_probe", "knn", "logistic")
#: Protocols that train by gradient descent on the training loop (the others only embed).
TRAINED = ("finetune", "linear_probe")


class _EpochSubset(Subset):
    """A label-fraction subset that forwards ``set_epoch`` to its dataset (for seeded augmentation)."""

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset, which seeds its augmentation per (seed, epoch, index)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_dataset(cfg: dict, in_domains: list[str], split: str, *, augment: bool):
    """One split of ``finetune.dataset`` for ``in_domains`` (``augment``: random crops and flips).

    Returns:
        A dataset with ``task`` and ``num_classes`` (and ``class_names`` where the data has them) attributes,
        or None when the data has no such split (evaluation splits only).

    Raises:
        ValueError: ``data_path`` unset, unknown dataset, or a ``finetune.task`` that does not match the data.
    """
    ft = cfg["finetune"]
    if not cfg["data_path"]:
        raise ValueError("config key 'data_path' is not set (MMEarth file set, GEO-Bench root or BigEarthNet folder)")
    ds = get_dataset_kind(ft["dataset"]).build(cfg, list(in_domains), split, augment)
    if ds is None:
        return None
    if ft["task"] is not None and ft["task"] != ds.task:
        raise ValueError(f"finetune.task is {ft['task']!r} but {ft['dataset']} data of this config is {ds.task!r} "
                         "(leave finetune.task null: it is derived from the data)")
    return ds


def training_set(cfg: dict, in_domains: list[str], *, augment: bool):
    """The labelled training samples every protocol uses: ``data.train_split`` reduced to
    ``finetune.label_fraction`` (a seeded subset, :func:`utils.finetune.label_fraction_indices`)."""
    ds = build_dataset(cfg, in_domains, cfg["data"]["train_split"], augment=augment)
    if cfg["finetune"]["label_fraction"] < 1.0:
        ds = _EpochSubset(ds, label_fraction_indices(len(ds), cfg["finetune"]["label_fraction"], cfg["seed"]))
    return ds


def _meta(ds) -> object:
    return ds.dataset if isinstance(ds, Subset) else ds


def _scalars(metrics: dict) -> dict:
    """The scalar entries of a metrics dict (what log records and tables show)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}


class FineTuner(LoopTask):
    """One fine-tuning (or probing) run for one input-domain subset: data, model, step, evaluation.

    Args:
        cfg: The resolved config of the run.
        info: This process's rank, world size and device.
        in_domains: Input domains.
        out: Output folder.
        pretrained: The pretraining checkpoint (v2 dict) or None.

    Raises:
        ValueError: an unknown protocol, or kNN / logistic on a segmentation task.
    """

    kind = "finetuning"

    def __init__(self, cfg: dict, info: DistInfo, in_domains: list[str], out: Path, pretrained: dict | None) -> None:
        self.cfg, self.info, self.out, self.ft = cfg, info, out, cfg["finetune"]
        self.protocol = self.ft["protocol"]
        self.checkpoint_step = pretrained.get("step") if pretrained else None
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"finetune.protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        self.trained = self.protocol in TRAINED
        # The data delivers the encoder's metadata fields (the checkpoint's, else model.metadata) where it has them.
        fields = pretrained["encoder"]["spec"].get("metadata", []) if pretrained else cfg["model"]["metadata"]
        data_cfg = {**cfg, "model": {**cfg["model"], "metadata": list(fields)}}
        self.sets = {"train": training_set(data_cfg, in_domains, augment=self.trained)}
        for name, split in get_dataset_kind(self.ft["dataset"]).eval_splits(cfg).items():
            self.sets[name] = build_dataset(data_cfg, in_domains, split, augment=False) if split else None
        self.sets = {k: v for k, v in self.sets.items() if v is not None}
        meta = _meta(self.sets["train"])
        self.task, self.num_classes = meta.task, meta.num_classes
        self.class_names = class_names_or_ids(getattr(meta, "class_names", None), self.num_classes)
        if not self.trained and self.task == "segmentation":
            raise ValueError(f"finetune.protocol {self.protocol!r} supports classification and multilabel, not "
                             "segmentation (use linear_probe or finetune)")
        self.metric = self.ft["metric"] or DEFAULT_METRIC[self.task]
        # a training loader shuffles and drops the last partial batch; the embedding protocols read every sample
        loaders = {k: make_loader(v, cfg, info, train=self.trained and k == "train") for k, v in self.sets.items()}
        self.loaders = {k: v[0] for k, v in loaders.items()}
        self.train_set, (self.train_loader, self.train_gen) = self.sets["train"], loaders["train"]
        self.net = self._build_model(in_domains, pretrained).to(info.device)
        if info.world_size > 1 and not self.trained:
            # No DDP wrapper broadcasts rank 0's weights here, and ranks are seeded apart: new adapters (or a
            # from-scratch encoder) would differ per rank and the gathered embeddings would not be comparable.
            self.net.load_state_dict(broadcast_object({k: v.cpu() for k, v in self.net.state_dict().items()}))
        self.layer_decay = self._layer_decay()
        if self.trained:
            self.lr = (self.ft["probe_blr"] * total_batch_size(cfg, info.world_size) / 256
                       if self.protocol == "linear_probe" else effective_lr(cfg, info.world_size))
            groups = self._param_groups()
            self.param_groups_info = self._describe(groups)
            optimizer = (build_optimizer(groups, cfg["optim"], self.lr) if self.protocol == "finetune" else
                         build_probe_optimizer(groups, self.lr, name=self.ft["probe_optimizer"],
                                               momentum=self.ft["probe_momentum"]))
        else:  # nothing is optimised: the engine only moves batches and sets the precision
            self.lr, optimizer = 0.0, None
            self.param_groups_info = self._describe([])
        self.engine = build_engine(self.net, optimizer, cfg, info, ddp=self.trained)
        self.metrics = TaskMetrics(self.task, self.num_classes, info.device, class_names=self.class_names)
        self.best, self.history = None, []
        self._embedded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.logistic = None

    def _build_model(self, in_domains: list[str], pretrained: dict | None) -> FineTuneModel:
        encoder, self.load_report = build_backbone(self.cfg, pretrained, in_domains)
        head, patch_size = None, self.ft["patch_size"]
        if self.trained:
            head = build_head(self.task, self.ft["head"], encoder=encoder, num_classes=self.num_classes,
                              pool=self.ft["pool"], probe=self.protocol == "linear_probe", patch_size=patch_size)
        return FineTuneModel(encoder, head, freeze_encoder=self.protocol != "finetune", pool=self.ft["pool"],
                             patch_size=patch_size)

    def _layer_decay(self) -> float | None:
        """Layer-wise lr decay of this run: fine-tuning a checkpoint only (``optim.layer_decay``, null = the
        task's default); a from-scratch run has nothing pretrained to protect (``finetune.scratch_layer_decay``)."""
        if self.protocol != "finetune":
            return None
        if self.load_report is None:
            return self.ft["scratch_layer_decay"]
        ld = self.cfg["optim"]["layer_decay"]
        return default_layer_decay(self.task) if ld is None else ld

    def _param_groups(self) -> list[dict]:
        """Optimiser groups: layer decay on the pretrained encoder parameters; adapters new to the checkpoint
        and the head at the full rate; probes: ``finetune.probe_weight_decay``."""
        optim = self.cfg["optim"]
        new = self.load_report.new_domains if self.load_report is not None else []
        wd = optim["weight_decay"] if self.protocol == "finetune" else self.ft["probe_weight_decay"]
        return param_groups(self.net, wd, decay_everything=optim["decay_everything"], layer_decay=self.layer_decay,
                            num_layers=self.net.encoder.depth, full_rate=new_parameter_prefixes(new))

    def _describe(self, groups: list[dict]) -> dict:
        """What ``<output_dir>/param_groups.json`` holds."""
        name = None if not self.trained else "adamw" if self.protocol == "finetune" else self.ft["probe_optimizer"]
        return {"protocol": self.protocol, "optimizer": name, "peak_lr": self.lr, "layer_decay": self.layer_decay,
                "new_domains": self.load_report.new_domains if self.load_report is not None else None,
                "groups": describe_param_groups(groups, self.lr)}

    def peak_lr(self, cfg: dict, world_size: int) -> float:
        """``finetune.probe_blr * total_batch / 256`` for a linear probe, ``optim.blr * total_batch / 256`` else."""
        return self.lr

    def describe(self) -> str:
        """The start line: protocol, inputs and training samples."""
        return f"{self.protocol} on {', '.join(self.net.in_domains)}: {len(self.sets['train'])} training samples"

    # ------------------------------------------------------------------ step and evaluation
    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (ignore index -1 for segmentation) or BCE-with-logits (multi-label), in fp32."""
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), label.float())
        return F.cross_entropy(logits.float(), label, ignore_index=-1)

    def step(self, batch: dict) -> dict:
        """One forward pass of the (possibly DDP-wrapped) model: ``{"loss": fp32 scalar}``."""
        logits = self.engine.model(batch["inputs"], batch["valid"], batch.get("metadata"))
        return {"loss": self.loss(logits, batch["label"])}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Metrics of the current model over a whole split (all ranks; DDP is bypassed).

        With several ranks the distributed sampler pads the split to a multiple of the world size by repeating
        up to ``world_size - 1`` samples, which then count twice (not for kNN / logistic: their embeddings are
        de-duplicated by sample index).
        """
        if self.protocol == "knn":
            return self.evaluate_knn(split)
        if self.protocol == "logistic":
            return self.evaluate_logistic(split)
        self.net.eval()
        self.metrics.reset()
        for batch in self.loaders[split]:
            batch = self.engine.to_device(batch)
            with autocast(self.info.device, self.engine.precision):
                logits = self.net(batch["inputs"], batch["valid"], batch.get("metadata"))
            self.metrics.update(logits.float(), batch["label"])
        self.net.train()
        return self.metrics.compute()

    @torch.no_grad()
    def embeddings(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embeddings (N, D) float32 and labels of every sample of ``split`` (all ranks; CPU tensors).

        Computed once per split and kept; the kNN and logistic protocols also keep them in
        ``<output_dir>/embeddings.npz`` (see :meth:`load_or_embed`).
        """
        if split not in self._embedded:
            self.net.eval()
            embs, labels, index = [], [], []
            for batch in self.loaders[split]:
                index.append(torch.as_tensor(batch["index"]))
                batch = self.engine.to_device(batch)
                with autocast(self.info.device, self.engine.precision):
                    embs.append(self.net.embed(batch["inputs"], batch["valid"], batch.get("metadata")).float().cpu())
                labels.append(batch["label"].cpu())
            gathered = all_gather_object((torch.cat(embs), torch.cat(labels), torch.cat(index)))
            emb, lab, idx = (torch.cat([g[i] for g in gathered]) for i in range(3))
            _, first = np.unique(idx.numpy(), return_index=True)  # drop the distributed sampler's padding
            keep = torch.from_numpy(np.sort(first))
            self._embedded[split] = (emb[keep], lab[keep])
            self.net.train()
        return self._embedded[split]

    def _embedding_key(self) -> str:
        """What the cached embeddings depend on (a cache with another key is recomputed)."""
        c, ft, data = self.cfg, self.ft, self.cfg["data"]
        keys = {"data_path": str(c["data_path"]), "in_domains": self.net.in_domains, "seed": c["seed"],
                "finetune": {k: ft[k] for k in ("checkpoint", "from_scratch", "dataset", "target", "geobench_task",
                                                "partition", "label_fraction", "pool", "test_split", "patch_size")},
                "data": {k: data[k] for k in ("train_split", "val_split", "input_size", "resize", "elevation_norm")},
                "checkpoint_step": self.checkpoint_step}
        return json.dumps(keys, sort_keys=True, default=str)

    def load_or_embed(self) -> None:
        """Fill the embeddings of every split from ``<output_dir>/embeddings.npz`` when it was written for this
        configuration, else compute them and write the file (arrays ``<split>_x`` (N, D), ``<split>_y``)."""
        path = self.out / "embeddings.npz"
        key = self._embedding_key()
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key and all(f"{s}_x" in z for s in self.sets):
                    self._embedded = {s: (torch.from_numpy(z[f"{s}_x"]), torch.from_numpy(z[f"{s}_y"]))
                                      for s in self.sets}
                    return
        arrays = {}
        for split in self.sets:
            x, y = self.embeddings(split)
            arrays[f"{split}_x"], arrays[f"{split}_y"] = x.numpy(), y.numpy()
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            np.savez(self.out / "embeddings.tmp.npz", key=np.array(key), **arrays)
            (self.out / "embeddings.tmp.npz").replace(path)

    @torch.no_grad()
    def evaluate_knn(self, split: str) -> dict:
        """kNN (``finetune.knn_k`` neighbours, cosine, exp(sim / T) votes) of ``split`` against the labelled
        training samples (the memory bank: ``num_train`` samples)."""
        train_emb, train_lab = self.embeddings("train")
        emb, lab = self.embeddings(split)
        scores = knn_scores(train_emb, train_lab, emb, num_classes=self.num_classes, k=self.ft["knn_k"],
                            temperature=self.ft["knn_temperature"])
        self.metrics.reset()
        self.metrics.update(scores, lab, probabilities=True)
        return self.metrics.compute()

    def _score(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """The validation metric of class probabilities (the logistic probe's C selection)."""
        m = TaskMetrics(self.task, self.num_classes, class_names=self.class_names)
        m.update(torch.from_numpy(probs), torch.as_tensor(labels), probabilities=True)
        return m.compute()[self.metric]

    def fit_logistic(self):
        """The logistic-regression probe on the training embeddings, C chosen on validation (fitted once)."""
        if self.logistic is None:
            x, y = (t.numpy() for t in self.embeddings("train"))
            val = [t.numpy() for t in self.embeddings("val")] if "val" in self.sets else [None, None]
            self.logistic = fit_logistic(x, y, num_classes=self.num_classes, cs=list(self.ft["logistic_c"]),
                                         score=self._score, val_x=val[0], val_y=val[1],
                                         max_iter=self.ft["logistic_max_iter"], seed=self.cfg["seed"])
        return self.logistic

    def evaluate_logistic(self, split: str) -> dict:
        """Metrics of the logistic-regression probe's class probabilities on ``split``."""
        probe = self.fit_logistic()
        x, y = self.embeddings(split)
        self.metrics.reset()
        self.metrics.update(torch.from_numpy(probe.predict_proba(x.numpy())), y, probabilities=True)
        return self.metrics.compute()

    def embedding_map(self, log: RunLogger) -> None:
        """After a probe of a classification / multi-label task: a t-SNE map of the test (else val) embeddings
        coloured by label, ``<output_dir>/embedding_maps/tsne_<split>.png`` (``finetune.embedding_map_samples``)."""
        n = self.ft["embedding_map_samples"]
        if self.protocol == "finetune" or self.task == "segmentation" or not n:
            return
        split = next(s for s in ("test", "val", "train") if s in self.sets)
        x, y = self.embeddings(split)
        if not self.info.is_main:
            return
        if len(x) < 4:
            log.write(f"embedding map skipped: the {split} split has {len(x)} samples (t-SNE needs 4)")
            return
        title = (f"{self.protocol}, {'+'.join(self.net.in_domains)}: t-SNE of {min(n, len(x))} {split} embeddings "
                 f"(pool {self.ft['pool']})")
        path, = save_pictures(self.out, split, {"kind": "embedding_map", "embeddings": x.numpy(), "labels": y.numpy(),
                                               "class_names": self.class_names, "title": title, "max_samples": n,
                                               "seed": self.cfg["seed"]})
        log.write(f"embedding map: {path}")

    # ------------------------------------------------------------------ loop hooks
    def state(self) -> dict:
        """``encoder`` (architecture, domains, weights), ``head``, best score, history and input domains."""
        domain_info = getattr(_meta(self.sets["train"]), "domain_info", None)
        return {"encoder": ckpt.encoder_entry(self.net.encoder, domain_info() if domain_info else None),
                "head": {"state_dict": self.net.head.state_dict()}, "best": self.best, "history": self.history,
                "in_domains": self.net.in_domains, "task": self.task}

    def load_state(self, state: dict, path: Path) -> None:
        """Load encoder and head weights (exact key check), best score and history."""
        weights = {**{f"encoder.{k}": v for k, v in state["encoder"]["state_dict"].items()},
                   **{f"head.{k}": v for k, v in state["head"]["state_dict"].items()}}
        ckpt.load_state_checked(self.net, weights, what=f"fine-tuning model ({path})")
        self.best, self.history = state["best"], state["history"]

    def end_epoch(self, epoch: int, last: bool, log: RunLogger) -> tuple[dict, list[str]]:
        """Validation every ``finetune.eval_every_epochs`` (and at the last epoch); a better validation metric
        writes ``checkpoint-best.pth``."""
        entries, extra = {}, []
        if "val" in self.sets and (epoch % self.ft["eval_every_epochs"] == 0 or last):
            val = self.evaluate("val")
            entries = {f"val_{k}": v for k, v in _scalars(val).items()}
            if self.best is None or val[self.metric] > self.best["value"]:
                self.best = {"epoch": epoch, "value": val[self.metric]}
                extra.append("checkpoint-best.pth")
        self.history.append({"epoch": epoch, **entries})
        return entries, extra

    def final_metrics(self) -> dict:
        """Validation and test metrics of the best checkpoint (the last model without validation)."""
        best = self.out / "checkpoint-best.pth"
        if self.trained and best.is_file():
            self.load_state(ckpt.read_checkpoint(best, kind=self.kind), best)
        return {split: self.evaluate(split) for split in ("val", "test") if split in self.sets}


def _print_results(metrics: dict, task: str) -> None:
    rows = [{"split": s, **_scalars(m)} for s, m in metrics.items()]
    print(format_table(rows, ["split", *[k for k in rows[0] if k != "split"]]) if rows else "no metrics")
    if task == "segmentation" and metrics:
        splits = list(metrics)
        names = list(metrics[splits[0]]["per_class_iou"])
        table = [{"class": n, **{f"{s}_iou": ("absent" if n in metrics[s]["absent_classes"] else
                                              metrics[s]["per_class_iou"][n]) for s in splits}} for n in names]
        print(format_table(table, ["class", *[f"{s}_iou" for s in splits]]))


def run_one(cfg: dict, info: DistInfo, in_domains: list[str], out: Path, pretrained: dict | None) -> dict:
    """Fine-tune (or probe) one input subset into ``out``; returns the results dict (also ``out/results.json``)."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.update(output_dir=str(out), in_domains=list(in_domains))
    check_output_dir(run_cfg, out)
    seed_everything(cfg["seed"] + info.rank)  # every grid entry starts from the same RNG state
    tuner = FineTuner(run_cfg, info, list(in_domains), out, pretrained)
    protocol = cfg["finetune"]["protocol"]
    loop = TrainLoop(run_cfg, info, tuner, out) if tuner.trained else None
    if info.is_main:
        save_config(run_cfg, out)
        (out / "param_groups.json").write_text(json.dumps(tuner.param_groups_info, indent=1))
    log = loop.logger() if loop else RunLogger(out, enabled=info.is_main, total_steps=0, wandb_cfg=cfg["wandb"],
                                               config=run_cfg, world_size=info.world_size)
    t0 = time.perf_counter()
    try:
        report = tuner.load_report
        if report is None:
            origin = "from scratch" + (" (the checkpoint's architecture)" if cfg["finetune"]["from_scratch"] else "")
        else:
            origin = f"pretrained, new adapters for {report.new_domains or 'no domain'}"
        log.write(f"encoder {origin}" if loop else f"{tuner.describe()}; encoder {origin}")
        if protocol != "finetune" and (report is None or report.new_domains):
            log.write(f"warning: with a frozen encoder ({protocol}), "
                      f"{'the whole backbone' if report is None else 'the new adapters'} stay at their random "
                      "initialisation; finetune.protocol=finetune trains them")
        if protocol == "linear_probe" and cfg["finetune"]["head"] != "linear":
            log.write(f"linear_probe: a linear head on the frozen tokens (finetune.head {cfg['finetune']['head']!r} "
                      "is the head of finetune.protocol=finetune)")
        if loop is not None:
            loop.run(log)
        else:
            tuner.load_or_embed()
        metrics = tuner.final_metrics()
        tuner.embedding_map(log)
        extra = {}
        if tuner.logistic is not None:
            lg = tuner.logistic
            extra["logistic"] = {"c": lg.c, "val_scores": {str(c): v for c, v in lg.val_scores.items()},
                                 "not_converged": lg.not_converged}
            log.write(f"logistic: C = {lg.c:g} (best validation {tuner.metric} among {len(lg.val_scores) or 1} values)")
            if lg.not_converged:
                log.write(f"warning: logistic regression did not converge for C = {lg.not_converged} within "
                          f"finetune.logistic_max_iter={cfg['finetune']['logistic_max_iter']} iterations")
    finally:
        log.close()
    results = {"metrics": metrics, "metric": tuner.metric, "task": tuner.task, "protocol": protocol,
               "in_domains": list(in_domains), "best_epoch": tuner.best and tuner.best["epoch"],
               "checkpoint": cfg["finetune"]["checkpoint"], "from_scratch": cfg["finetune"]["from_scratch"],
               "num_train": len(tuner.sets["train"]), "label_fraction": cfg["finetune"]["label_fraction"],
               "class_names": tuner.class_names, **extra,
               "new_domains": report.new_domains if report else [], "seconds": round(time.perf_counter() - t0, 2)}
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        _print_results(metrics, tuner.task)
    return results


@torch.no_grad()
def majority_baseline(cfg: dict, in_domains: list[str], split: str) -> tuple[int, str, dict]:
    """Score of predicting the most frequent class of the labelled training samples (``finetune.label_fraction``
    applied) everywhere (segmentation: every pixel; multi-label: that one label on every sample).

    Returns:
        (majority class id, its name, metrics of that constant prediction on ``split``).
    """
    train = training_set(cfg, in_domains, augment=False)
    tr = _meta(train)
    counts = torch.zeros(tr.num_classes, dtype=torch.int64)
    for i in range(len(train)):
        lab = train[i]["label"]
        lab = lab[lab >= 0].flatten() if tr.task == "segmentation" else lab
        counts += torch.bincount(lab.long(), minlength=tr.num_classes) if tr.task != "multilabel" else lab.long()
    major = int(counts.argmax())
    names = class_names_or_ids(getattr(tr, "class_names", None), tr.num_classes)
    metrics = TaskMetrics(tr.task, tr.num_classes, class_names=names)
    ds = build_dataset(cfg, in_domains, split, augment=False)
    for i in range(len(ds)):
        lab = ds[i]["label"][None]
        logits = torch.full((1, tr.num_classes, *lab.shape[1:]), -10.0)
        logits[:, major] = 10.0
        metrics.update(logits, lab)
    return major, names[major], metrics.compute()


def run_grid(cfg: dict, info: DistInfo, pretrained: dict | None) -> dict:
    """Fine-tune once per ``finetune.grid`` entry; write ``<output_dir>/results.json`` with the table."""
    out, ft = Path(cfg["output_dir"]), cfg["finetune"]
    rows, runs = [], []
    for i, domains in enumerate(ft["grid"]):
        res = run_one(cfg, info, domains, out / "grid" / f"{i}_{'+'.join(domains)}", pretrained)
        split = "test" if "test" in res["metrics"] else "val"
        runs.append(res)
        rows.append({"inputs": list(domains), "split": split, res["metric"]: res["metrics"][split][res["metric"]],
                     f"val_{res['metric']}": res["metrics"].get("val", {}).get(res["metric"]),
                     "seconds": res["seconds"]})
    metric, split = runs[0]["metric"], rows[0]["split"]
    results = {"grid": rows, "metric": metric, "split": split, "protocol": ft["protocol"],
               "checkpoint": ft["checkpoint"], "runs": runs}
    if info.is_main:
        eval_split = ft["test_split"] if split == "test" else cfg["data"]["val_split"]
        major, name, base = majority_baseline(cfg, ft["grid"][0], eval_split if ft["dataset"] == "mmearth" else split)
        results[f"majority_baseline_{metric}"] = base[metric]
        results["majority_class"], results["majority_class_id"] = name, major
        (out / "results.json").write_text(json.dumps(results, indent=1))
        table = rows + [{"inputs": f"majority class '{name}' everywhere", "split": split, metric: base[metric]}]
        print(f"\nflexibility grid ({ft['protocol']}, {metric} on {split}):")
        print(format_table(table, ["inputs", metric, f"val_{metric}", "seconds"]))
    return results


def main(cfg: dict) -> dict:
    """Fine-tune / probe with the resolved config; a non-empty ``finetune.grid`` runs one job per input subset.

    Returns:
        The results dict written to ``<output_dir>/results.json``.

    Raises:
        FileNotFoundError / ValueError: a missing or non-pretraining ``finetune.checkpoint``, data errors.
    """
    info = init_distributed(cfg["device"])
    try:
        out = Path(cfg["output_dir"])
        with ckpt.lock_output_dir(out) if info.is_main else contextlib.nullcontext():  # one run per folder
            check_output_dir(cfg, out)
            if info.is_main:
                save_config(cfg, out)
            path = cfg["finetune"]["checkpoint"]
            pretrained = read_pretraining_checkpoint(path) if path else None
            pre_norm = pretrained and pretrained["config"].get("data", {}).get("elevation_norm")
            mmearth = cfg["finetune"]["dataset"] == "mmearth"
            if info.is_main and mmearth and pre_norm and pre_norm != cfg["data"]["elevation_norm"]:
                print(f"warning: data.elevation_norm is {cfg['data']['elevation_norm']!r} but the checkpoint was pretrained "
                      f"with {pre_norm!r}", file=sys.stderr)
            if cfg["finetune"]["grid"]:
                return run_grid(cfg, info, pretrained)
            return run_one(cfg, info, list(cfg["in_domains"]), out, pretrained)
    finally:
        cleanup()


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``--config FILE key=value ...``; ``--predict ...`` writes maps (utils/predict.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--predict" in argv:
        from utils.predict import main as predict

        predict([a for a in argv if a != "--predict"])
        return
    args = build_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    main(config_from_args(args))


if __name__ == "__main__":
    with user_errors():
        cli(sys.argv[1:])
