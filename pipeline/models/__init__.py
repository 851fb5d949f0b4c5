"""Backbones by name: video students (R3D, R(2+1)D, C3D, TSN) and 2D image teachers.

build_video_model(name, ...) -> model on (B, C, T, H, W) clips
build_image_model(name, ...) -> model on (B, C, H, W) images
Each model has features(x) -> (B, feature_dim), feature_map(x) (before pooling), the attributes
feature_dim and memory_format, and returns logits, or features when num_classes == 0.
"""

from torch import nn

from pipeline.models.image import ImageResNet, resnet_2d
from pipeline.models.video import C3D, TSN, BranchedVideoNet, VideoResNet, tsn, video_resnet

VIDEO_MODELS = ("r3d_18", "r2plus1d_18", "c3d", "tsn_resnet18", "tsn_resnet50")
IMAGE_MODELS = ("resnet18", "resnet50")

# Tiny settings for the embedded synthetic world (48x48 stored frames, 32-40 px crops, 8-16
# frames, 12 classes): 0.1-1M parameters, fast on 2 CPU cores (numbers: pipeline/bench/models.py).
# Why stem_stride 4 without max-pool: the same 4x stem downsampling as a 2D ResNet's stride-2 conv +
# max-pool, at about half the cost (the 7x7 stem conv is the most expensive layer at these sizes);
# the image settings share the stem, so a tiny resnet18 built at the R3D's width inflates into it.
TINY_VIDEO_SETTINGS: dict[str, dict] = {
    "r3d_18": {"width": 8, "layers": (1, 1, 1, 1), "stem_stride": 4, "stem_pool": False},
    "r2plus1d_18": {"width": 8, "layers": (1, 1, 1, 1), "stem_stride": 4, "stem_pool": False},
    "c3d": {"width": 8, "stem_stride": 2},  # pool1 1x2x2, as C3D's: a 2 x 2 map at 40 px
    "tsn_resnet18": {"width": 16, "layers": (1, 1, 1, 1), "stem_stride": 4, "stem_pool": False},
    "tsn_resnet50": {"width": 8, "layers": (1, 1, 1, 1), "stem_stride": 4, "stem_pool": False},
}
TINY_IMAGE_SETTINGS: dict[str, dict] = {
    "resnet18": {"width": 16, "layers": (1, 1, 1, 1), "stem_stride": 4, "stem_pool": False},
    "resnet50": {"width": 8, "layers": (1, 1, 1, 1), "stem_stride": 4, "stem_pool": False},
}


def build_video_model(
    name: str,
    *,
    num_classes: int,
    width: int = 64,
    layers: tuple[int, ...] | None = None,
    stem_stride: int = 2,
    stem_pool: bool | None = None,
    temporal_padding: str = "zeros",
    branches: int = 1,
    shared_stages: int = 3,
) -> VideoResNet | C3D | TSN | BranchedVideoNet:
    """A video backbone by name (VIDEO_MODELS); the defaults are torchvision's architectures.

    layers=None / stem_pool=None keep the architecture's own choice (R3D/R(2+1)D: (2, 2, 2, 2),
    no stem max-pool; TSN: its 2D ResNet's depths, with the max-pool; C3D has neither).
    temporal_padding ("zeros" | "replicate") only exists for the ResNets (TSN has no temporal
    convolutions).
    branches > 1: a BranchedVideoNet of that many high-level encoders over the first
    `shared_stages` stages (stem, layer1, ...), one backbone built per branch.
    """
    if branches > 1:
        if name.startswith("tsn_"):
            raise ValueError(f"{name} has no stages to branch (use r3d_18, r2plus1d_18 or c3d)")
        options = {"width": width, "layers": layers, "stem_stride": stem_stride,
                   "stem_pool": stem_pool, "temporal_padding": temporal_padding}  # fmt: skip
        backbones = [build_video_model(name, num_classes=0, **options) for _ in range(branches)]
        return BranchedVideoNet(backbones, shared_stages=shared_stages, num_classes=num_classes)
    if branches != 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    if name == "c3d":
        if layers is not None or stem_pool is not None or temporal_padding != "zeros":
            raise ValueError("c3d has fixed conv groups: layers, stem_pool and temporal_padding "
                             "do not apply")  # fmt: skip
        return C3D(num_classes=num_classes, width=width, stem_stride=stem_stride)
    if name.startswith("tsn_"):
        if temporal_padding != "zeros":
            raise ValueError(
                f"{name} has no temporal convolutions; temporal_padding must be 'zeros'"
            )
        return tsn(
            name.removeprefix("tsn_"),
            num_classes=num_classes,
            width=width,
            layers=layers,
            stem_stride=stem_stride,
            stem_pool=True if stem_pool is None else stem_pool,
        )
    if name not in VIDEO_MODELS:
        raise ValueError(f"unknown video model {name!r}; choose from {VIDEO_MODELS}")
    return video_resnet(
        name,
        num_classes=num_classes,
        width=width,
        layers=layers or (2, 2, 2, 2),
        stem_stride=stem_stride,
        stem_pool=bool(stem_pool),
        temporal_padding=temporal_padding,
    )


def build_image_model(
    name: str,
    *,
    num_classes: int,
    width: int = 64,
    layers: tuple[int, ...] | None = None,
    stem_stride: int = 2,
    stem_pool: bool = True,
) -> ImageResNet:
    """A 2D image backbone by name (IMAGE_MODELS); the defaults are torchvision's resnets."""
    return resnet_2d(
        name,
        num_classes=num_classes,
        width=width,
        layers=layers,
        stem_stride=stem_stride,
        stem_pool=stem_pool,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
