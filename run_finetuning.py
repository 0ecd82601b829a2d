"""MultiMAE fine-tuning, linear probing and kNN on classification, multi-label and segmentation tasks.

    python run_finetuning.py --config cfgs/finetune/demo.yaml data_path=DATA finetune.checkpoint=CKPT output_dir=OUT
    python run_finetuning.py --config cfgs/finetune/geobench.yaml --config cfgs/finetune/geobench/m-eurosat.yaml \
        data_path=GEO_BENCH finetune.checkpoint=CKPT
    torchrun --nproc_per_node=4 run_finetuning.py --config cfgs/finetune/geobench.yaml \
        --config cfgs/finetune/geobench/m-bigearthnet.yaml ...

Protocols (``finetune.protocol``): ``finetune`` (whole model, layer-wise lr decay, no weight decay on norms and
biases), ``linear_probe`` (frozen encoder, trained head), ``knn`` (frozen encoder, k = 20 cosine neighbours).
``finetune.checkpoint: null`` trains from scratch (a baseline). ``finetune.grid`` (a list of ``in_domains``
lists) fine-tunes the same checkpoint once per input subset into ``<output_dir>/grid/<i>_<domains>/`` and
writes one table, with the score of the majority-class baseline. Results: ``<output_dir>/results.json``
``{"metrics": {"val": {...}, "test": {...}}, ...}``; the best epoch by the validation metric is kept in
``checkpoint-best.pth`` and evaluated on test at the end. Re-running a command resumes from
``checkpoint-last.pth``. Every key: ``cfgs/defaults.yaml``; several ``--config`` files merge in order.

The encoder comes from the checkpoint's ``encoder`` entry whatever objective pretrained it
(``finetune.from_scratch=true`` builds the same architecture without the weights); ``finetune.task`` is what
the dataset is (``utils.data.registry``). Shared with ``run_pretraining.py``: config, torchrun set-up, loaders,
optimiser groups and schedule, the engine and the training loop with its checkpoints and resume
(``utils.loop``); what this script owns is the fine-tuning task: its step, evaluation, the pretrained-weight
load (``utils.finetune``) and the grid.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from utils import checkpoint as ckpt
from utils.config import (build_arg_parser, check_output_dir, config_from_args, effective_lr, save_config,
                          user_errors)
from utils.data.registry import get_dataset_kind
from utils.dist import DistInfo, all_gather_object, broadcast_object, cleanup, init_distributed, seed_everything
from utils.engine import autocast, build_engine
from utils.finetune import (FineTuneModel, build_backbone, build_head, default_layer_decay, knn_scores,
                            label_fraction_indices, read_pretraining_checkpoint)
from utils.logger import RunLogger
from utils.loop import LoopTask, TrainLoop
from utils.metrics import DEFAULT_METRIC, TaskMetrics, format_table
from utils.optim import build_optimizer, param_groups
from utils.sampler import make_loader

PROTOCOLS = ("finetune", "linear_probe", "knn")


class _EpochSubset(Subset):
    """A label-fraction subset that forwards ``set_epoch`` to its dataset (for seeded augmentation)."""

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset, which seeds its augmentation per (seed, epoch, index)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_dataset(cfg: dict, in_domains: list[str], split: str, *, train: bool):
    """One split of ``finetune.dataset`` for ``in_domains`` (``train``: augmented, label fraction applied).

    Returns:
        A dataset with ``task`` and ``num_classes`` attributes (through ``.dataset`` for a subset), or None
        when the data has no such split.

    Raises:
        ValueError: ``data_path`` unset, unknown dataset, or a ``finetune.task`` that does not match the data.
    """
    ft = cfg["finetune"]
    if not cfg["data_path"]:
        raise ValueError("config key 'data_path' is not set (MMEarth file set, GEO-Bench root or BigEarthNet folder)")
    ds = get_dataset_kind(ft["dataset"]).build(cfg, list(in_domains), split, train)
    if ds is None:
        return None
    if ft["task"] is not None and ft["task"] != ds.task:
        raise ValueError(f"finetune.task is {ft['task']!r} but {ft['dataset']} data of this config is {ds.task!r} "
                         "(leave finetune.task null: it is derived from the data)")
    if train and ft["label_fraction"] < 1.0:
        ds = _EpochSubset(ds, label_fraction_indices(len(ds), ft["label_fraction"], cfg["seed"]))
    return ds


def _meta(ds) -> object:
    return ds.dataset if isinstance(ds, Subset) else ds


class FineTuner(LoopTask):
    """One fine-tuning (or probing) run for one input-domain subset: data, model, step, evaluation.

    Args:
        cfg: The resolved config of the run.
        info: This process's rank, world size and device.
        in_domains: Input domains.
        out: Output folder.
        pretrained: The pretraining checkpoint (v2 dict) or None.
    """

    kind = "finetuning"

    def __init__(self, cfg: dict, info: DistInfo, in_domains: list[str], out: Path, pretrained: dict | None) -> None:
        self.cfg, self.info, self.out, self.ft = cfg, info, out, cfg["finetune"]
        if self.ft["protocol"] not in PROTOCOLS:
            raise ValueError(f"finetune.protocol must be one of {', '.join(PROTOCOLS)}, got {self.ft['protocol']!r}")
        self.sets = {"train": build_dataset(cfg, in_domains, cfg["data"]["train_split"], train=True)}
        eval_splits = dict(get_dataset_kind(self.ft["dataset"]).eval_splits(cfg))
        if self.ft["protocol"] == "knn":
            eval_splits["train_eval"] = cfg["data"]["train_split"]
        for name, split in eval_splits.items():
            self.sets[name] = build_dataset(cfg, in_domains, split, train=False) if split else None
        self.sets = {k: v for k, v in self.sets.items() if v is not None}
        meta = _meta(self.sets["train"])
        self.task, self.num_classes = meta.task, meta.num_classes
        self.metric = self.ft["metric"] or DEFAULT_METRIC[self.task]
        loaders = {k: make_loader(v, cfg, info, train=k == "train") for k, v in self.sets.items()}
        self.loaders = {k: v[0] for k, v in loaders.items()}
        self.train_set, (self.train_loader, self.train_gen) = self.sets["train"], loaders["train"]
        self.net = self._build_model(in_domains, pretrained).to(info.device)
        if info.world_size > 1 and self.ft["protocol"] == "knn":
            # No DDP wrapper broadcasts rank 0's weights here, and ranks are seeded apart: new adapters (or a
            # from-scratch encoder) would differ per rank and the gathered embeddings would not be comparable.
            self.net.load_state_dict(broadcast_object({k: v.cpu() for k, v in self.net.state_dict().items()}))
        ld = cfg["optim"]["layer_decay"]
        ld = (default_layer_decay(self.task) if ld is None else ld) if self.ft["protocol"] == "finetune" else None
        groups = param_groups(self.net, cfg["optim"]["weight_decay"], decay_everything=cfg["optim"]["decay_everything"],
                              layer_decay=ld, num_layers=self.net.encoder.depth)
        self.engine = build_engine(self.net, build_optimizer(groups, cfg["optim"], effective_lr(cfg, info.world_size)),
                                   cfg, info, ddp=self.ft["protocol"] != "knn")
        self.metrics = TaskMetrics(self.task, self.num_classes, info.device)
        self.best, self.history = None, []

    def _build_model(self, in_domains: list[str], pretrained: dict | None) -> FineTuneModel:
        encoder, self.load_report = build_backbone(self.cfg, pretrained, in_domains)
        head = build_head(self.task, self.ft["head"], encoder=encoder, num_classes=self.num_classes,
                          pool=self.ft["pool"], full_finetune=self.ft["protocol"] == "finetune")
        return FineTuneModel(encoder, head, freeze_encoder=self.ft["protocol"] != "finetune")

    def describe(self) -> str:
        """The start line: protocol, inputs and training samples."""
        return f"{self.ft['protocol']} on {', '.join(self.net.in_domains)}: {len(self.sets['train'])} training samples"

    # ------------------------------------------------------------------ step and evaluation
    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (ignore index -1 for segmentation) or BCE-with-logits (multi-label), in fp32."""
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), label.float())
        return F.cross_entropy(logits.float(), label, ignore_index=-1)

    def step(self, batch: dict) -> dict:
        """One forward pass of the (possibly DDP-wrapped) model: ``{"loss": fp32 scalar}``."""
        logits = self.engine.model(batch["inputs"], batch["valid"])
        return {"loss": self.loss(logits, batch["label"])}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Metrics of the current model over a whole split (all ranks; DDP is bypassed).

        With several ranks the distributed sampler pads the split to a multiple of the world size by repeating
        up to ``world_size - 1`` samples, which then count twice.
        """
        if self.ft["protocol"] == "knn":
            return self.evaluate_knn(split)
        self.net.eval()
        self.metrics.reset()
        for batch in self.loaders[split]:
            batch = self.engine.to_device(batch)
            with autocast(self.info.device, self.engine.precision):
                logits = self.net(batch["inputs"], batch["valid"])
            self.metrics.update(logits.float(), batch["label"])
        self.net.train()
        return self.metrics.compute()

    def _embeddings(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        embs, labels = [], []
        for batch in self.loaders[split]:
            batch = self.engine.to_device(batch)
            embs.append(self.net.embed(batch["inputs"], batch["valid"]).float())
            labels.append(batch["label"])
        gathered = all_gather_object((torch.cat(embs).cpu(), torch.cat(labels).cpu()))
        return torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])

    @torch.no_grad()
    def evaluate_knn(self, split: str) -> dict:
        """kNN (``finetune.knn_k`` neighbours, cosine, exp(sim / T) votes) of ``split`` against the training set."""
        if self.task == "segmentation":
            raise ValueError("finetune.protocol 'knn' supports classification and multilabel, not segmentation")
        self.net.eval()
        train_emb, train_lab = self._embeddings("train_eval")
        emb, lab = self._embeddings(split)
        scores = knn_scores(train_emb, train_lab, emb, num_classes=self.num_classes, k=self.ft["knn_k"],
                            temperature=self.ft["knn_temperature"])
        self.metrics.reset()
        # knn scores are probabilities; the multilabel metric expects logits, so map them through logit
        self.metrics.update(torch.logit(scores.clamp(1e-6, 1 - 1e-6)) if self.task == "multilabel" else scores, lab)
        return self.metrics.compute()

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
            entries = {f"val_{k}": v for k, v in val.items() if not isinstance(v, list)}
            if self.best is None or val[self.metric] > self.best["value"]:
                self.best = {"epoch": epoch, "value": val[self.metric]}
                extra.append("checkpoint-best.pth")
        self.history.append({"epoch": epoch, **entries})
        return entries, extra

    def final_metrics(self) -> dict:
        """Validation and test metrics of the best checkpoint (the last model without validation)."""
        best = self.out / "checkpoint-best.pth"
        if self.ft["protocol"] != "knn" and best.is_file():
            self.load_state(ckpt.read_checkpoint(best, kind=self.kind), best)
        return {split: self.evaluate(split) for split in ("val", "test") if split in self.sets}


def run_one(cfg: dict, info: DistInfo, in_domains: list[str], out: Path, pretrained: dict | None) -> dict:
    """Fine-tune (or probe) one input subset into ``out``; returns the results dict (also ``out/results.json``)."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.update(output_dir=str(out), in_domains=list(in_domains))
    check_output_dir(run_cfg, out)
    seed_everything(cfg["seed"] + info.rank)  # every grid entry starts from the same RNG state
    tuner = FineTuner(run_cfg, info, list(in_domains), out, pretrained)
    protocol = cfg["finetune"]["protocol"]
    loop = TrainLoop(run_cfg, info, tuner, out) if protocol != "knn" else None
    if info.is_main:
        save_config(run_cfg, out)
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
        if loop is not None:
            loop.run(log)
        metrics = tuner.final_metrics()
    finally:
        log.close()
    results = {"metrics": metrics, "metric": tuner.metric, "task": tuner.task, "protocol": protocol,
               "in_domains": list(in_domains), "best_epoch": tuner.best and tuner.best["epoch"],
               "checkpoint": cfg["finetune"]["checkpoint"], "from_scratch": cfg["finetune"]["from_scratch"],
               "num_train": len(tuner.sets["train"]),
               "new_domains": report.new_domains if report else [], "seconds": round(time.perf_counter() - t0, 2)}
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        rows = [{"split": s, **{k: v for k, v in m.items() if not isinstance(v, list)}} for s, m in metrics.items()]
        print(format_table(rows, ["split", *[k for k in rows[0] if k != "split"]]) if rows else "no metrics")
    return results


@torch.no_grad()
def majority_baseline(cfg: dict, in_domains: list[str], split: str) -> tuple[int, dict]:
    """Score of predicting the most frequent training class everywhere (segmentation: every pixel).

    Returns:
        (majority class id, metrics of that constant prediction on ``split``).
    """
    tr = _meta(build_dataset(cfg, in_domains, cfg["data"]["train_split"], train=False))
    counts = torch.zeros(tr.num_classes, dtype=torch.int64)
    for i in range(len(tr)):
        lab = tr[i]["label"]
        lab = lab[lab >= 0].flatten() if tr.task == "segmentation" else lab
        counts += torch.bincount(lab.long(), minlength=tr.num_classes) if tr.task != "multilabel" else lab.long()
    major = int(counts.argmax())
    metrics = TaskMetrics(tr.task, tr.num_classes)
    ds = build_dataset(cfg, in_domains, split, train=False)
    for i in range(len(ds)):
        lab = ds[i]["label"][None]
        logits = torch.full((1, tr.num_classes, *lab.shape[1:]), -10.0)
        logits[:, major] = 10.0
        metrics.update(logits, lab)
    return major, metrics.compute()


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
        major, base = majority_baseline(cfg, ft["grid"][0], eval_split if ft["dataset"] == "mmearth" else split)
        results[f"majority_baseline_{metric}"] = base[metric]
        results["majority_class"] = major
        (out / "results.json").write_text(json.dumps(results, indent=1))
        table = rows + [{"inputs": f"majority class {major} everywhere", "split": split, metric: base[metric]}]
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
