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


def test_classification_f1_and_map_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.62, 0.28], [0.25, 0.45, 0.30], [0.15, 0.5, 0.35]])
    label = torch.tensor([0, 1, 2, 1])  # arg-max predictions 0, 1, 1, 1
    for scores, flag in ((probs, True), (probs.log(), False)):  # probabilities, or logits whose softmax they are
        m = TaskMetrics("classification", 3)
        m.update(scores, label, probabilities=flag)
        out = m.compute()
        assert out["accuracy"] == pytest.approx(3 / 4) and out["micro_f1"] == pytest.approx(3 / 4)
        # F1 per class: 1 (tp 1), 2*2 / (2*2 + 1) = 0.8 (tp 2, fp 1), 0 (fn 1)
        assert out["macro_f1"] == pytest.approx((1 + 0.8 + 0) / 3)
        # AP per class: class 0 and 1 rank their positives first (1, 1); class 2's positive (0.30) is second (1/2)
        assert out["macro_map"] == pytest.approx((1 + 1 + 0.5) / 3)
        # micro: the 12 scores ranked together; the positives 0.7, 0.62, 0.5 lead, 0.30 comes 6th -> 4/6
        assert out["map"] == pytest.approx((1 + 1 + 1 + 4 / 6) / 4)


def test_multilabel_f1_map_and_exact_match():
    m = TaskMetrics("multilabel", 3)
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4], [0.7, 0.3, 0.9]])
    label = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    m.update(torch.logit(probs), label)
    out = m.compute()
    # threshold 0.5: predictions 101, 010, 101 -> only the third sample is exactly right
    assert out["accuracy"] == pytest.approx(1 / 3)
    # TP 4, FP 1 (sample 1, label 2), FN 1 (sample 2, label 2) -> 2*4 / (2*4 + 1 + 1)
    assert out["micro_f1"] == pytest.approx(0.8)
    # per label: 1, 1, 2*1 / (2*1 + 1 + 1) = 0.5
    assert out["macro_f1"] == pytest.approx((1 + 1 + 0.5) / 3)
    # AP per label: 1, 1, (1 + 2/3) / 2 (label 2: 0.9 hit, 0.6 miss, 0.4 hit)
    assert out["macro_map"] == pytest.approx((1 + 1 + 5 / 6) / 3)
    # micro: 9 scores, hits at ranks 1-4 and 6 -> (4 + 5/6) / 5
    assert out["map"] == pytest.approx((4 + 5 / 6) / 5)
    m.reset()
    m.update(probs, label, probabilities=True)
    assert m.compute()["micro_f1"] == pytest.approx(0.8)


def test_miou_ignores_ignore_index_and_marks_absent_classes_by_name():
    names = ["water", "trees", "grass", "snow"]
    m = TaskMetrics("segmentation", 4, class_names=names)
    label = torch.tensor([[[0, 0, 1, -1], [1, 2, 2, -1]]])
    pred = torch.tensor([[[0, 1, 1, 3], [1, 2, 0, 0]]])  # class 3 predicted only on an ignored pixel
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    m.update(logits, label)
    out = m.compute()
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: pred 1 at (0,1)(0,2)(1,0), label 1 at (0,2)(1,0)
    # -> TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2; class 3 never occurs on a scored pixel
    assert list(out["per_class_iou"]) == names
    assert [out["per_class_iou"][n] for n in names[:3]] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert out["per_class_iou"]["snow"] is None and out["absent_classes"] == ["snow"]
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    # a class predicted on a scored pixel but absent from the labels: absent, and 0 in the mIoU (torchmetrics)
    m.reset()
    m.update(torch.tensor([[[0, 3]]]), torch.tensor([[[0, 0]]]))
    out = m.compute()
    assert out["absent_classes"] == ["trees", "grass", "snow"] and out["per_class_iou"]["water"] == pytest.approx(0.5)
    assert out["miou"] == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(ValueError, match="2 class names for 4 classes"):
        TaskMetrics("segmentation", 4, class_names=["a", "b"])


def test_bad_task_and_table():
    with pytest.raises(ValueError, match="finetune.task"):
        TaskMetrics("detection", 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        TaskMetrics("classification", 1)
    table = format_table([{"inputs": ["s2_rgb", "s1"], "miou": 0.41234}], ["inputs", "miou"])
    assert "s2_rgb,s1" in table and "0.4123" in table
