import pytest
import torch
from torch import nn

from pipeline.evaluate import (
    average_precision,
    confusion_figure,
    confusion_matrix,
    evaluate,
    mean_average_precision,
    mean_class_accuracy,
    per_class_accuracy,
    per_class_average_precision,
    topk_accuracy,
)

SCORES = torch.tensor(
    [
        [0.1, 0.7, 0.2],
        [0.5, 0.3, 0.2],
        [0.2, 0.3, 0.5],
        [0.6, 0.3, 0.1],
    ]
)
LABELS = torch.tensor([1, 1, 0, 2])


def test_topk_accuracy_hand_case():
    # top-1 hits row 0 only; top-2 also row 1; top-5 is capped at the 3 classes.
    assert topk_accuracy(SCORES, LABELS, (1, 2, 5)) == {1: 0.25, 2: 0.5, 5: 1.0}


def test_confusion_and_class_accuracy_hand_case():
    confusion = confusion_matrix(SCORES.argmax(1), LABELS, 3)
    assert confusion.tolist() == [[0, 0, 1], [1, 1, 0], [1, 0, 0]]
    assert per_class_accuracy(confusion) == [0.0, 0.5, 0.0]
    assert mean_class_accuracy(confusion) == pytest.approx(1 / 6)
    # A fourth class without samples is left out of the mean, not counted as 0.
    wide = confusion_matrix(SCORES.argmax(1), LABELS, 4)
    assert per_class_accuracy(wide)[3] is None
    assert mean_class_accuracy(wide) == pytest.approx(1 / 6)


def test_average_precision_hand_cases():
    # Hits at ranks 1 and 3: (1/1 + 2/3) / 2.
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap == pytest.approx(5 / 6)
    # A tie (0.5, 0.5) between a hit and a miss is one threshold: recall 0.5 at precision 1/3,
    # then recall 1 at precision 2/4 -> 0.5/3 + 0.5/2. Ranking the hit first would give 0.5.
    ap = average_precision(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([0, 1, 0, 1]))
    assert ap == pytest.approx(0.5 / 3 + 0.5 / 2)
    assert average_precision(torch.tensor([0.3, 0.2]), torch.tensor([0, 0])) is None


def test_mean_average_precision_skips_absent_classes():
    scores = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    labels = torch.tensor([0, 1, 1])
    # class 0: hit at rank 1 -> 1.0; class 1 scores (0.1, 0.3, 0.6): hits at ranks 1, 2 -> 1.0
    # class 2 has no positives: None, and left out of the mean.
    assert per_class_average_precision(scores, labels) == [1.0, 1.0, None]
    assert mean_average_precision(scores, labels) == 1.0
    labels = torch.tensor([1, 0, 1])
    # class 0 (0.8, 0.6, 0.3): hit at rank 2 -> 0.5; class 1 (0.1, 0.3, 0.6): hits at 1, 3 ->
    # (1 + 2/3) / 2.
    assert mean_average_precision(scores, labels) == pytest.approx((0.5 + 5 / 6) / 2)


def _logit_batch(views_logits, labels):
    """A batch whose "video" (B, V, 3, 1, 1, 1) holds the logits themselves (model: Flatten)."""
    video = torch.tensor(views_logits, dtype=torch.float32).reshape(len(labels), -1, 3, 1, 1, 1)
    return {"video": video, "label": torch.tensor(labels)}


def test_multi_view_averages_softmax_over_views():
    # Video 0 (label 0): one confident right view, two mildly wrong -> clips 1/3, video right.
    # Video 1 (label 1): one very confident wrong view, two right ones. Averaging logits would
    # pick class 0 (20/3 > 4/3); averaging softmax picks class 1 (0.52 > 0.40).
    batch = _logit_batch(
        [[[4, 0, 0], [0, 1, 0], [0, 1, 0]], [[20, 0, 0], [0, 2, 0], [0, 2, 0]]], [0, 1]
    )
    model = nn.Flatten()
    model.train()
    metrics = evaluate(model, [batch], num_classes=3, multi_view=True)
    assert model.training  # mode restored
    assert metrics["num_videos"] == 2 and metrics["num_clips"] == 6
    assert metrics["clip_top1"] == pytest.approx(0.5)
    assert metrics["video_top1"] == 1.0
    assert metrics["clip_confusion"] == [[1, 2, 0], [1, 2, 0], [0, 0, 0]]
    assert metrics["video_confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert metrics["video_per_class_acc"] == [1.0, 1.0, None]
    assert metrics["video_mean_class_acc"] == 1.0
    assert metrics["video_map"] == 1.0
    # multi_view=None decides from the shape.
    assert evaluate(model, [batch])["video_top1"] == 1.0


def test_single_view_batches_give_clip_metrics_only():
    batch = {"video": SCORES.reshape(4, 3, 1, 1, 1), "label": LABELS}
    metrics = evaluate(nn.Flatten(), [batch, batch], multi_view=False)
    assert metrics["clip_top1"] == 0.25 and metrics["num_clips"] == 8
    assert not any(k.startswith("video_") for k in metrics)
    with pytest.raises(ValueError, match="multi_view=True expects 6-D"):
        evaluate(nn.Flatten(), [batch], multi_view=True)
    with pytest.raises(ValueError, match="not 5"):
        evaluate(nn.Flatten(), [batch], num_classes=5)
    unlabeled = {"video": batch["video"], "label": torch.tensor([0, -1, 1, 2])}
    with pytest.raises(ValueError, match="label -1"):
        evaluate(nn.Flatten(), [unlabeled])


def test_confusion_figure_writes_png(tmp_path):
    out = tmp_path / "figs" / "confusion.png"
    confusion_figure([[3, 1], [0, 0]], ["walk", "run"], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]  # no temp files left
    with pytest.raises(ValueError, match="2 class names"):
        confusion_figure([[1]], ["walk", "run"], out)
