"""utils/metrics.py against values computed by hand."""

import math

import pytest
import torch

from utils.metrics import TaskMetrics, format_table


def test_accuracy_micro_over_batches():
    m = TaskMetrics("classification", 3)
    m.update(torch.tensor([[5.0, 0, 0], [0, 5.0, 0]]), torch.tensor([0, 1]))  # 2 right
    m.update(torch.tensor([[0, 0, 5.0], [0, 0, 5.0]]), torch.tensor([1, 2]))  # 1 right of 2
    assert m.compute()["accuracy"] == pytest.approx(3 / 4)
    m.reset()
    m.update(torch.tensor([[0, 0, 5.0]]), torch.tensor([0]))
    assert m.compute()["accuracy"] == 0.0


def test_multilabel_micro_f1_and_map():
    m = TaskMetrics("multilabel", 3)
    # logits whose sigmoid is 0.9, 0.2, 0.6 / 0.1, 0.8, 0.4
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4]])
    m.update(torch.logit(probs), torch.tensor([[1, 0, 0], [0, 1, 1]]))
    out = m.compute()
    # threshold 0.5: TP = 2 (0.9, 0.8), FP = 1 (0.6), FN = 1 (0.4) -> F1 = 2*2 / (2*2 + 1 + 1)
    assert out["micro_f1"] == pytest.approx(4 / 6)
    # micro AP over the 6 flattened scores: hits at ranks 1, 2, 4 -> (1 + 1 + 3/4) / 3
    assert out["map"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_miou_ignores_ignore_index_and_absent_classes():
    m = TaskMetrics("segmentation", 4)
    label = torch.tensor([[[0, 0, 1, -1], [1, 2, 2, -1]]])
    pred = torch.tensor([[[0, 1, 1, 3], [1, 2, 0, 0]]])  # class 3 predicted only on an ignored pixel
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    m.update(logits, label)
    out = m.compute()
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 0... pred 1 at (0,1)(0,2)(1,0), label 1 at (0,2)(1,0)
    # -> TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2; class 3 never occurs on a scored pixel -> None
    assert out["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert out["per_class_iou"][3] is None
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert not any(isinstance(v, float) and math.isnan(v) for v in out["per_class_iou"] if v is not None)


def test_bad_task_and_table():
    with pytest.raises(ValueError, match="finetune.task"):
        TaskMetrics("detection", 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        TaskMetrics("classification", 1)
    table = format_table([{"inputs": ["s2_rgb", "s1"], "miou": 0.41234}], ["inputs", "miou"])
    assert "s2_rgb,s1" in table and "0.4123" in table
