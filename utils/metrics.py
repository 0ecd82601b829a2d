"""Evaluation metrics for fine-tuning, computed over the whole evaluation set with torchmetrics.

The conventions follow MMEarth-train's GEO-Bench protocol (``engine_finetune.py``), torchgeo-bench and MoE-MAE's
probes (accuracy, micro and macro F1, micro and macro mAP):

- ``classification``: ``accuracy`` = multiclass accuracy, micro average (top-1); ``micro_f1`` (equal to the
  accuracy for single-label data) and ``macro_f1`` (mean over the classes that occur in the labels or the
  predictions); ``map`` / ``macro_map`` = average precision of the class probabilities (softmax of the logits),
  micro (every (sample, class) score ranked together against the one-hot labels) and macro (per class, averaged).
- ``multilabel``: ``accuracy`` = exact match (every label of a sample right, scikit-learn's ``accuracy_score``);
  ``micro_f1`` / ``macro_f1`` = multilabel F1 at threshold 0.5 on sigmoid scores; ``map`` / ``macro_map`` =
  multilabel average precision, micro (torchgeo-bench's micro-mAP) and macro (labels without a positive sample
  are left out of the mean).
- ``segmentation``: ``miou`` = macro Jaccard index over the classes that occur in the prediction or the
  target (torchmetrics drops classes whose union is empty; a class predicted but absent from the labels counts
  0); ``per_class_iou`` = {class name: IoU}, ``None`` for a class absent from the split's labels, which are
  also listed in ``absent_classes``; pixels labelled ``IGNORE_INDEX`` (-1) are skipped.

torchmetrics accumulates sufficient statistics (confusion matrices, scores) and all-gathers them across
ranks in ``compute()`` when ``torch.distributed`` is initialised, so every rank returns the same values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAveragePrecision,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassStatScores,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from multimae.domains import IGNORE_INDEX

__all__ = ["TASKS", "DEFAULT_METRIC", "TaskMetrics", "class_names_or_ids", "format_table"]

TASKS = ("classification", "multilabel", "segmentation")
#: Validation metric that selects the best checkpoint when ``finetune.metric`` is null.
DEFAULT_METRIC = {"classification": "accuracy", "multilabel": "micro_f1", "segmentation": "miou"}


def class_names_or_ids(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The data's class names, or ``class_<i>`` for data that has none.

    Raises:
        ValueError: ``class_names`` has another length than ``num_classes``.
    """
    if not class_names:
        return [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return [str(n) for n in class_names]


class TaskMetrics:
    """Accumulates predictions of one task over an evaluation set and reports named metrics.

    Args:
        task: ``classification``, ``multilabel`` or ``segmentation``.
        num_classes: Number of classes K (labels for ``multilabel``).
        device: Device of the metric states (the model's device).
        class_names: K names (the keys of ``per_class_iou``); None: ``class_<i>``.

    Raises:
        ValueError: unknown ``task``, ``num_classes`` < 2 (< 1 for multilabel), or class names of another count.
    """

    def __init__(self, task: str, num_classes: int, device: torch.device | str = "cpu",
                 class_names: Sequence[str] | None = None) -> None:
        if task not in TASKS:
            raise ValueError(f"finetune.task must be one of {', '.join(TASKS)}, got {task!r}")
        if num_classes < (1 if task == "multilabel" else 2):
            raise ValueError(f"{task} needs at least 2 classes, got num_classes={num_classes}")
        self.task = task
        self.num_classes = num_classes
        self.class_names = class_names_or_ids(class_names, num_classes)
        k = num_classes
        if task == "classification":
            metrics = {
                "accuracy": MulticlassAccuracy(k, average="micro"),
                "micro_f1": MulticlassF1Score(k, average="micro"),
                "macro_f1": MulticlassF1Score(k, average="macro"),
                "map": MultilabelAveragePrecision(k, average="micro"),  # fed one-hot labels
                "macro_map": MulticlassAveragePrecision(k, average="macro"),
            }
        elif task == "multilabel":
            metrics = {
                "accuracy": MultilabelExactMatch(k),
                "micro_f1": MultilabelF1Score(k, average="micro"),
                "macro_f1": MultilabelF1Score(k, average="macro"),
                "map": MultilabelAveragePrecision(k, average="micro"),
                "macro_map": MultilabelAveragePrecision(k, average="macro"),
            }
        else:
            metrics = {
                "miou": MulticlassJaccardIndex(k, average="macro", ignore_index=IGNORE_INDEX),
                "per_class_iou": MulticlassJaccardIndex(k, average="none", ignore_index=IGNORE_INDEX,
                                                        zero_division=float("nan")),
                "support": MulticlassStatScores(k, average="none", ignore_index=IGNORE_INDEX),
            }
        self.metrics = {name: m.to(device) for name, m in metrics.items()}

    @torch.no_grad()
    def update(self, scores: torch.Tensor, label: torch.Tensor, *, probabilities: bool = False) -> None:
        """Add one batch.

        Args:
            scores: ``classification`` (B, K) logits; ``multilabel`` (B, K) logits (sigmoid applied here);
                ``segmentation`` (B, K, H, W) logits or already arg-maxed class ids (B, H, W).
            label: (B,) int64 class ids; (B, K) multi-hot {0, 1}; (B, H, W) int64 with -1 = ignore.
            probabilities: ``scores`` are already probabilities (rows summing to 1 for classification, per label
                for multi-label: kNN votes, the logistic probe), not logits.
        """
        label = label.long()
        if self.task == "segmentation":
            preds = scores.argmax(dim=1) if scores.dim() == 4 else scores
            for m in self.metrics.values():
                m.update(preds, label)
            return
        if self.task == "classification":
            probs = scores.float() if probabilities else scores.float().softmax(dim=1)
            preds = probs.argmax(dim=1)
            for name in ("accuracy", "micro_f1", "macro_f1"):
                self.metrics[name].update(preds, label)
            self.metrics["map"].update(probs, F.one_hot(label, self.num_classes))
            self.metrics["macro_map"].update(probs, label)
            return
        probs = scores.float() if probabilities else torch.sigmoid(scores.float())
        for m in self.metrics.values():
            m.update(probs, label)

    def compute(self) -> dict:
        """Metrics over everything added so far (synced across ranks): floats; for segmentation also
        ``per_class_iou`` {class name: IoU or None} and ``absent_classes`` (names absent from the labels)."""
        values = {name: m.compute() for name, m in self.metrics.items()}
        if self.task != "segmentation":
            return {name: float(v) for name, v in values.items()}
        support = values.pop("support")[:, 4]  # (K, 5): tp, fp, tn, fn, support
        ious = values.pop("per_class_iou").tolist()
        absent = [name for name, n in zip(self.class_names, support.tolist()) if n == 0]
        per_class = {name: None if n == 0 or math.isnan(v) else float(v)
                     for name, v, n in zip(self.class_names, ious, support.tolist())}
        return {"miou": float(values["miou"]), "per_class_iou": per_class, "absent_classes": absent}

    def reset(self) -> None:
        """Clear the accumulated states (start of a new evaluation pass)."""
        for m in self.metrics.values():
            m.reset()


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of ``rows`` (dicts) with the given ``columns``; floats shown with 4 decimals.

    Example: ``format_table([{"inputs": "s2_rgb", "miou": 0.41}], ["inputs", "miou"])``.
    """

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return "-" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
