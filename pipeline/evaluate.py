"""Classification metrics and multi-view testing.

Accuracies are fractions in [0, 1]. "clip" metrics count every clip/view on its own; "video"
metrics (batches whose "video" is (B, V, C, T, H, W), e.g. K clips x 3 crops) average the softmax
over a video's V views first. Per-class lists hold None for classes absent from the labels, so the
dict stays valid JSON and means run over the classes present only.
"""

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.data.clips import prepare_video
from pipeline.io import atomic_path


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict:
    """{k: fraction of rows whose label is among the k highest scores}; k is capped at the class
    count (top-5 of a 3-class problem is top-3)."""
    labels = labels.reshape(-1, 1)
    result = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        result[k] = (top == labels).any(dim=1).sum().item() / len(labels)
    return result


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """(num_classes, num_classes) int64 counts; rows are true labels, columns predictions."""
    flat = labels.long() * num_classes + predictions.long()
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class (diagonal over row sum); None for a class with no samples."""
    totals = confusion.sum(dim=1)
    return [
        (confusion[c, c] / totals[c]).item() if totals[c] > 0 else None
        for c in range(confusion.shape[0])
    ]


def mean_class_accuracy(confusion: torch.Tensor) -> float:
    """Mean of per-class accuracies over the classes that have samples."""
    return _mean_present(per_class_accuracy(confusion))


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """Area under the precision-recall step curve (sklearn's average_precision_score).

    Tied scores form one threshold, so their order does not matter. None without positives.
    """
    positives = positives.bool()
    if not positives.any():
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    hits = positives[order].double()
    true_pos = hits.cumsum(0)
    false_pos = (1 - hits).cumsum(0)
    # Evaluate only at the last row of each run of equal scores: one threshold per distinct score.
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_pos, false_pos = true_pos[last_of_run], false_pos[last_of_run]
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / true_pos[-1]
    recall_steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_steps * precision).sum().item()


def per_class_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> list[float | None]:
    """Average precision of each class's score column against (labels == class)."""
    return [average_precision(scores[:, c], labels == c) for c in range(scores.shape[1])]


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """mAP over the classes present in `labels` (scores: (N, num_classes) softmax scores)."""
    return _mean_present(per_class_average_precision(scores, labels))


def _mean_present(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else float("nan")


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict:
    """Every metric of one level (clip or video) under `prefix`: top-1/5, mean class accuracy, mAP,
    per-class accuracy and AP, and the confusion matrix (nested lists)."""
    num_classes = scores.shape[1]
    top = topk_accuracy(scores, labels, (1, 5))
    confusion = confusion_matrix(scores.argmax(dim=1), labels, num_classes)
    per_class_ap = per_class_average_precision(scores, labels)
    return {
        f"{prefix}_top1": top[1],
        f"{prefix}_top5": top[5],
        f"{prefix}_mean_class_acc": mean_class_accuracy(confusion),
        f"{prefix}_map": _mean_present(per_class_ap),
        f"{prefix}_per_class_acc": per_class_accuracy(confusion),
        f"{prefix}_per_class_ap": per_class_ap,
        f"{prefix}_confusion": confusion.tolist(),
    }


def _amp_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    multi_view: bool | None = None,
    images: bool | None = None,
    amp: str = "off",
    progress: bool = True,
) -> dict:
    """Test `model` (clips -> logits) on `loader`'s batches; returns a JSON-able metrics dict.

    multi_view: True requires (B, V, C, T, H, W) batches and adds video-level metrics; False
    requires (B, C, T, H, W); None decides from the first batch. images: True for image batches,
    whose views are (C, H, W): (B, C, H, W), or (B, V, C, H, W) with multi_view ("clip" metrics
    then count images, "video" ones average an image's views); None decides from the first batch:
    images if it has the key "image" (image datasets set it, pipeline.teachers.images) or is 4-D.
    num_classes: None takes the logits' width. amp: "off" | "bf16" | "fp16" autocast for the
    forward pass. Every label must be >= 0. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    amp_dtype = _amp_dtype(amp)
    was_training = model.training
    model.eval()
    clip_scores, video_scores, labels = [], [], []
    views = None
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
                video = batch["video"]
                label = torch.as_tensor(batch["label"]).long()
                if (label < 0).any():
                    raise ValueError("evaluate needs labeled clips; the batch holds label -1")
                if images is None:
                    images = "image" in batch or video.dim() == 4
                view_dims = 3 if images else 4  # (C, H, W) images, (C, T, H, W) clips
                if multi_view is None:
                    multi_view = video.dim() == view_dims + 2
                expected = view_dims + (2 if multi_view else 1)
                if video.dim() != expected:
                    raise ValueError(
                        f"multi_view={multi_view} expects {expected}-D 'video' batches"
                        f"{' of images' if images else ''}, got shape {tuple(video.shape)}"
                    )
                views = video.shape[1] if multi_view else 1
                clips = video.flatten(0, 1) if multi_view else video
                clips = prepare_video(clips.to(device, non_blocking=True))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(clips)
                scores = logits.float().softmax(dim=1).cpu()
                if num_classes is not None and scores.shape[1] != num_classes:
                    raise ValueError(f"model gives {scores.shape[1]} classes, not {num_classes}")
                per_video = scores.reshape(len(label), views, -1)
                clip_scores.append(scores)
                video_scores.append(per_video.mean(dim=1))
                labels.append(label)
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("evaluate got an empty loader")
    labels = torch.cat(labels)
    metrics = {"num_videos": len(labels), "num_clips": len(labels) * views}
    metrics |= classification_metrics(
        torch.cat(clip_scores), labels.repeat_interleave(views), "clip"
    )
    if multi_view:
        metrics |= classification_metrics(torch.cat(video_scores), labels, "video")
    return metrics


def confusion_figure(
    confusion, class_names: Sequence[str], out_png: str | os.PathLike, title: str = ""
) -> None:
    """Row-normalised confusion matrix as a PNG, written atomically; class names shown up to 40."""
    counts = np.asarray(confusion, dtype=np.float64)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion {counts.shape} does not match {len(class_names)} class names")
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = min(4 + 0.25 * len(class_names), 24)
    # Imported here: matplotlib costs a second at import, and training processes never plot.
    # Figure (not pyplot) renders with Agg and keeps no global state between calls.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if len(class_names) <= 40:
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion (row-normalised)")
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def linear_probe(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seed: int = 0
) -> dict:
    """Top-1 (percent) of a logistic regression on frozen features: fit on `train`
    (features, labels), scored on `test`. Measures what a representation holds before any
    fine-tuning (the usual companion of self-supervised evaluation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(*train)
    return {"top1": 100.0 * float(probe.score(*test)), "train_size": len(train[1])}


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, loader, *, device: str | torch.device = "cpu") -> None:
    """Re-estimate every BatchNorm's running mean and variance as the exact average over the
    clips of `loader` ("precise BN"), leaving the weights alone. A freshly initialised network's
    running statistics are the placeholders 0 and 1, so its eval-mode features are scaled at
    random, and any training at all, even on noise, would lift a probe of them; calibrated on the
    probe's own training clips, every network is compared on what its weights compute."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    model.to(device)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    for batch in loader:
        video = prepare_video(batch["video"].to(device))
        model.features(video.flatten(0, 1) if video.dim() == 6 else video)
    for m, (momentum, training) in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.train(training)
