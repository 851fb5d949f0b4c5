"""What every frozen image teacher is: a network, its own preprocessing, and what it outputs.

Teachers come from different codebases with different conventions (torchvision and Places365:
RGB with ImageNet statistics; SCHP: BGR with reversed statistics), so each declares its own
`Preprocess`, and the feature cache records it next to the checkpoint's sha256.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLOR_ORDERS = ("rgb", "bgr")
KINDS = ("classifier", "parsing")


@dataclass(frozen=True)
class Preprocess:
    """uint8 RGB frames -> the network's input: the short side resized to `size`, the centre
    size x size crop (ImageNet's evaluation transform: teachers trained on square images see
    people at their proportions), colour order, mean/std.

    mean and std are on the 0-1 scale and given in the network's channel order (for "bgr" the
    first value is the blue channel's).
    """

    color: str = "rgb"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size: int = 224

    def __post_init__(self):
        if self.color not in COLOR_ORDERS:
            raise ValueError(f"Preprocess.color must be one of {COLOR_ORDERS}, got {self.color!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("Preprocess.mean and .std need 3 values each, std > 0")
        if self.size < 8:
            raise ValueError(f"Preprocess.size must be >= 8, got {self.size}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 RGB -> (N, 3, size, size) float32, normalised, on frames' device."""
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(
                f"teachers take (N, H, W, 3) uint8 RGB frames, got {tuple(frames.shape)} "
                f"{frames.dtype}"
            )
        x = frames.permute(0, 3, 1, 2).float().div_(255)
        height, width = x.shape[-2:]
        if min(height, width) != self.size:
            scale = self.size / min(height, width)
            height, width = (
                max(self.size, round(height * scale)),
                max(self.size, round(width * scale)),
            )
            x = F.interpolate(
                x, size=(height, width), mode="bilinear", antialias=True, align_corners=False
            )
        top, left = (height - self.size) // 2, (width - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        if self.color == "bgr":
            x = x.flip(1)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


class FrozenTeacher(nn.Module):
    """A frozen teacher: uint8 frames in, per-frame outputs out, always in eval mode.

    `network` must have `features(x) -> (N, D)` (the pooled penultimate layer); a "parsing"
    teacher's network must instead have `features_and_parts(x) -> ((N, D), (N, P, h, w) logits)`.
    forward returns {"embedding": (N, D) float32} and, for parsing, "parts": (N, P, s, s) softmax
    probabilities resized to parts_size (the cache's low resolution).
    """

    def __init__(
        self,
        name: str,
        network: nn.Module,
        preprocess: Preprocess,
        *,
        kind: str = "classifier",
        feature_dim: int,
        classes: tuple[str, ...] = (),
        parts_size: int = 8,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"teacher kind must be one of {KINDS}, got {kind!r}")
        self.name = name
        self.network = network.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.kind = kind
        self.feature_dim = feature_dim
        self.classes = tuple(classes)
        self.parts_size = parts_size

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # frozen: BatchNorm always uses its running statistics

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(frames)
        if self.kind == "classifier":
            return {"embedding": self.network.features(x).float()}
        embedding, part_logits = self.network.features_and_parts(x)
        parts = F.interpolate(
            part_logits.float(),
            size=(self.parts_size, self.parts_size),
            mode="bilinear",
            align_corners=False,
        ).softmax(dim=1)
        return {"embedding": embedding.float(), "parts": parts}
