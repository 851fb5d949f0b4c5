"""The synthetic world's human-parsing teacher: a tiny encoder-decoder, its training Method, mIoU.

It stands in for SCHP (a ResNet-101 parser, pipeline.teachers.schp) at 32-64 px: same interface
(`features_and_parts(x)` -> pooled embedding and part logits, see pipeline.teachers.base), same
label set (Pascal-Person-Part's 7 labels in the synthetic world), a few thousand times cheaper.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.evaluate import confusion_matrix
from pipeline.methods import Method, StepOutput
from pipeline.teachers.images import IGNORE_LABEL


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyParser(nn.Module):
    """Encoder of three stride-2 stages (w, 2w, 4w channels at 1/2, 1/4, 1/8 of the input) and
    an FPN-style decoder (1x1 laterals to w channels, top-down upsample-and-add, one 3x3 conv at
    1/2 resolution) whose part logits are upsampled to the input size.

    The embedding is the globally average-pooled last encoder stage (feature_dim = 4w): what the
    parser knows about the whole person, independent of where the parts are.
    """

    def __init__(self, *, num_classes: int, width: int = 16):
        super().__init__()
        self.stage1 = nn.Sequential(_conv(3, width, 2), _conv(width, width))
        self.stage2 = nn.Sequential(_conv(width, 2 * width, 2), _conv(2 * width, 2 * width))
        self.stage3 = nn.Sequential(_conv(2 * width, 4 * width, 2), _conv(4 * width, 4 * width))
        self.lateral1 = nn.Conv2d(width, width, 1)
        self.lateral2 = nn.Conv2d(2 * width, width, 1)
        self.lateral3 = nn.Conv2d(4 * width, width, 1)
        self.head = nn.Sequential(_conv(width, width), nn.Conv2d(width, num_classes, 1))
        self.feature_dim = 4 * width
        self.num_classes = num_classes

    def features_and_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, H, W) -> ((N, 4w) embedding, (N, num_classes, H, W) part logits)."""
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        top = self.lateral3(c3)
        top = F.interpolate(top, size=c2.shape[-2:], mode="nearest") + self.lateral2(c2)
        top = F.interpolate(top, size=c1.shape[-2:], mode="nearest") + self.lateral1(c1)
        logits = F.interpolate(
            self.head(top), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return c3.mean(dim=(2, 3)), logits

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_parts(x)[1]


def tiny_parsing(*, num_classes: int, width: int = 16) -> TinyParser:
    """Builder for arch {"type": "tiny_parsing", "width": w} (pipeline.teachers.load_teacher)."""
    return TinyParser(num_classes=num_classes, width=width)


class PartSegmentation(Method):
    """Per-pixel cross-entropy of a parser's part logits against batch["mask"] (label maps,
    IGNORE_LABEL pixels left out); logs the pixel accuracy. No class logits: StepOutput.logits
    is None, so the trainer reports no train top-1."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch: dict) -> StepOutput:
        _, logits = self.model.features_and_parts(batch["video"])
        mask = batch["mask"]
        loss = F.cross_entropy(logits, mask, ignore_index=IGNORE_LABEL)
        valid = mask != IGNORE_LABEL
        correct = ((logits.detach().argmax(dim=1) == mask) & valid).sum()
        return StepOutput(loss=loss, logs={"pixel_acc": correct / valid.sum().clamp(min=1)})


def iou_from_confusion(confusion: Tensor) -> list[float | None]:
    """Per-class intersection over union from a (C, C) pixel confusion matrix (rows: truth);
    None for a class that is neither present nor predicted."""
    intersection = confusion.diag().double()
    union = confusion.sum(dim=0).double() + confusion.sum(dim=1).double() - intersection
    return [(i / u).item() if u > 0 else None for i, u in zip(intersection, union, strict=True)]


def segmentation_metrics(
    model: nn.Module, loader, *, num_classes: int, device: str | torch.device = "cpu"
) -> dict:
    """Pixel confusion over `loader`'s {"video", "mask"} batches -> {"miou", "per_class_iou",
    "pixel_acc", "num_images"}; fractions in [0, 1], mIoU over the classes with a defined IoU.
    The model's train/eval mode is restored afterwards."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    images = 0
    try:
        with torch.inference_mode():
            for batch in loader:
                _, logits = model.features_and_parts(batch["video"].to(device))
                mask = batch["mask"]
                valid = mask != IGNORE_LABEL
                predictions = logits.argmax(dim=1).cpu()
                confusion += confusion_matrix(predictions[valid], mask[valid], num_classes)
                images += len(mask)
    finally:
        model.train(was_training)
    if images == 0:
        raise ValueError("segmentation_metrics got an empty loader")
    per_class = iou_from_confusion(confusion)
    present = [v for v in per_class if v is not None]
    return {
        "miou": sum(present) / len(present),
        "per_class_iou": per_class,
        "pixel_acc": (confusion.diag().sum() / confusion.sum().clamp(min=1)).item(),
        "num_images": images,
    }
