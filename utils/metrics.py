"""Evaluation metrics for fine-tuning, computed over the whole evaluation set with torchmetrics.

The conventions follow MMEarth-train's GEO-Bench protocol (``engine_finetune.py``; see
``../shared/reference/data_formats.md`` section 2.5) and torchgeo-bench:

- ``classification``: ``accuracy`` = multiclass accuracy, micro average (top-1).
- ``multilabel``: ``micro_f1`` = multilabel F1, micro average, threshold 0.5 on sigmoid scores;
  ``map`` = multilabel average precision, micro average (torchgeo-bench's micro-mAP).
- ``segmentation``: ``miou`` = macro Jaccard index over the classes that occur in the prediction or the
  target (torchmetrics drops classes whose union is empty); ``per_class_iou`` = one IoU per class,
  ``None`` for a class that never occurs; pixels labelled ``IGNORE_INDEX`` (-1) are skipped.

torchmetrics accumulates sufficient statistics (confusion matrices, scores) and all-gathers them across
ranks in ``compute()`` when ``torch.distributed`` is initialised, so every rank returns the same values.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassJaccardIndex,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from multimae.domains import IGNORE_INDEX

__all__ = ["TASKS", "DEFAULT_METRIC", "TaskMetrics", "format_table"]

TASKS = ("classification", "multilabel", "segmentation")
#: Validation metric that selects the best checkpoint when ``finetune.metric`` is null.
DEFAULT_METRIC = {"classification": "accuracy", "multilabel": "micro_f1", "segmentation": "miou"}


class TaskMetrics:
    """Accumulates predictions of one task over an evaluation set and reports named metrics.

    Args:
        task: ``classification``, ``multilabel`` or ``segmentation``.
        num_classes: Number of classes K (labels for ``multilabel``).
        device: Device of the metric states (the model's device).

    Raises:
        ValueError: unknown ``task`` or ``num_classes`` < 2 (< 1 for multilabel).
    """

    def __init__(self, task: str, num_classes: int, device: torch.device | str = "cpu") -> None:
        if task not in TASKS:
            raise ValueError(f"finetune.task must be one of {', '.join(TASKS)}, got {task!r}")
        if num_classes < (1 if task == "multilabel" else 2):
            raise ValueError(f"{task} needs at least 2 classes, got num_classes={num_classes}")
        self.task = task
        self.num_classes = num_classes
        if task == "classification":
            metrics = {"accuracy": MulticlassAccuracy(num_classes, average="micro")}
        elif task == "multilabel":
            metrics = {
                "micro_f1": MultilabelF1Score(num_classes, average="micro"),
                "map": MultilabelAveragePrecision(num_classes, average="micro"),
            }
        else:
            metrics = {
                "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX),
                "per_class_iou": MulticlassJaccardIndex(
                    num_classes, average="none", ignore_index=IGNORE_INDEX, zero_division=float("nan")
                ),
            }
        self.collection = MetricCollection(metrics, compute_groups=False).to(device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        """Add one batch.

        Args:
            logits: ``classification`` (B, K); ``multilabel`` (B, K) (sigmoid applied here);
                ``segmentation`` (B, K, H, W) or already arg-maxed class ids (B, H, W).
            label: (B,) int64 class ids; (B, K) multi-hot {0, 1}; (B, H, W) int64 with -1 = ignore.
        """
        if self.task == "classification":
            preds = logits.argmax(dim=1) if logits.dim() == 2 else logits
            self.collection.update(preds, label.long())
        elif self.task == "multilabel":
            self.collection.update(torch.sigmoid(logits.float()), label.long())
        else:
            preds = logits.argmax(dim=1) if logits.dim() == 4 else logits
            self.collection.update(preds, label.long())

    def compute(self) -> dict:
        """Metrics over everything added so far (synced across ranks): floats, plus a list for
        ``per_class_iou`` (``None`` where a class occurs in neither prediction nor target)."""
        out = {}
        for name, value in self.collection.compute().items():
            if value.dim() == 0:
                out[name] = float(value)
            else:
                out[name] = [None if math.isnan(v) else float(v) for v in value.tolist()]
        return out

    def reset(self) -> None:
        """Clear the accumulated states (start of a new evaluation pass)."""
        self.collection.reset()


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
