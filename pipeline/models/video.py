"""Video backbones: R3D-18 and R(2+1)D-18 (torchvision's layout) and TSN over a 2D ResNet.

Every model takes (B, C, T, H, W) float clips and offers:
  feature_map(x) -> (B, feature_dim, T', H', W')   last stage, before pooling
  features(x)    -> (B, feature_dim)               pooled penultimate features
  forward(x)     -> (B, num_classes) logits, or features when num_classes == 0
and the attributes `feature_dim` and `memory_format` (the layout to pass to
`model.to(memory_format=...)` on CUDA: channels_last_3d for 3D convs, channels_last for TSN).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, Conv3DSimple

from pipeline.models.image import RESNET_2D_SPECS, ImageResNet

ConvBuilder = type[Conv3DSimple] | type[Conv2Plus1D]


def r3d_stem(width: int, *, stride: int, pool: bool) -> nn.Sequential:
    """torchvision's BasicStem (3x7x7 conv, stride (1, s, s)) at any width."""
    stem = nn.Sequential(
        nn.Conv3d(
            3,
            width,
            kernel_size=(3, 7, 7),
            stride=(1, stride, stride),
            padding=(1, 3, 3),
            bias=False,
        ),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )
    if pool:
        stem.append(_spatial_max_pool())
    return stem


def r2plus1d_stem(width: int, *, stride: int, pool: bool) -> nn.Sequential:
    """torchvision's R2Plus1dStem (1x7x7 then 3x1x1); its 45 middle channels scale with width."""
    mid = max(1, round(45 * width / 64))
    stem = nn.Sequential(
        nn.Conv3d(
            3, mid, kernel_size=(1, 7, 7), stride=(1, stride, stride), padding=(0, 3, 3), bias=False
        ),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )
    if pool:
        stem.append(_spatial_max_pool())
    return stem


def _spatial_max_pool() -> nn.MaxPool3d:
    # the 2D ResNet's 3x3/2 max-pool, per frame: lets inflated 2D weights see the same resolution
    return nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))


class ReplicateTimePadConv3d(nn.Conv3d):
    """A Conv3d whose temporal border repeats the first/last frame instead of adding zeros.

    Why: with zero padding the edge frames see only part of the temporal kernel, so an
    I3D-inflated network differs from its 2D source even on a static clip. Spatial padding stays
    zeros. Parameter names and shapes are those of nn.Conv3d, so checkpoints are interchangeable.
    """

    def __init__(self, conv: nn.Conv3d) -> None:
        time_pad, height_pad, width_pad = conv.padding
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=(0, height_pad, width_pad),
            bias=conv.bias is not None,
        )
        self.time_pad = time_pad
        self.load_state_dict(conv.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, 0, self.time_pad, self.time_pad), mode="replicate")
        return super().forward(x)


def _replicate_time_padding(module: nn.Module) -> None:
    """Swap every temporally padded Conv3d under `module` for a ReplicateTimePadConv3d."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv3d) and child.padding[0] > 0:
            setattr(module, name, ReplicateTimePadConv3d(child))
        else:
            _replicate_time_padding(child)


class VideoResNet(nn.Module):
    """torchvision's VideoResNet (BasicBlock) with stage widths (w, 2w, 4w, 8w) and stem options.

    Stages 2-4 stride 2 in time and space, as in torchvision. At width 64, layers (2, 2, 2, 2)
    and the default stem, parameter names equal torchvision's r3d_18 / r2plus1d_18.
    """

    memory_format = torch.channels_last_3d

    def __init__(
        self,
        *,
        conv_builder: ConvBuilder,
        stem: Callable[..., nn.Sequential],
        layers: tuple[int, ...],
        num_classes: int,
        width: int = 64,
        stem_stride: int = 2,
        stem_pool: bool = False,
        temporal_padding: str = "zeros",
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers}")
        if temporal_padding not in ("zeros", "replicate"):
            raise ValueError(
                f"temporal_padding must be 'zeros' or 'replicate', got {temporal_padding!r}"
            )
        self.inplanes = width
        self.stem = stem(width, stride=stem_stride, pool=stem_pool)
        self.layer1 = self._make_layer(conv_builder, width, layers[0], stride=1)
        self.layer2 = self._make_layer(conv_builder, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(conv_builder, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(conv_builder, 8 * width, layers[3], stride=2)
        self.feature_dim = 8 * width * BasicBlock.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)
        if temporal_padding == "replicate":
            _replicate_time_padding(self)

    def _make_layer(
        self, conv_builder: ConvBuilder, planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(
                    self.inplanes,
                    planes,
                    kernel_size=1,
                    stride=conv_builder.get_downsample_stride(stride),
                    bias=False,
                ),
                nn.BatchNorm3d(planes),
            )
        stage = [BasicBlock(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes
        stage += [BasicBlock(planes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def feature_map(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def features(self, x: Tensor) -> Tensor:
        return self.feature_map(x).mean(dim=(2, 3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class TSN(ImageResNet):
    """Temporal Segment Network: a 2D ResNet on every frame (segment), average consensus.

    It is an ImageResNet (same parameter names), so 2D ImageNet checkpoints load into it strictly.
    Per-segment features are averaged before the classifier.
    """

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, feature_dim, T, h, w): each frame's 2D map, time kept."""
        batch, channels, frames, height, width = x.shape
        per_frame = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        maps = super().feature_map(per_frame)
        return maps.reshape(batch, frames, *maps.shape[1:]).transpose(1, 2)

    def features(self, x: Tensor) -> Tensor:
        # all frame maps have one size, so this is the mean of the per-segment pooled features
        return self.feature_map(x).mean(dim=(2, 3, 4))


VIDEO_RESNET_SPECS: dict[str, tuple[ConvBuilder, Callable[..., nn.Sequential]]] = {
    "r3d_18": (Conv3DSimple, r3d_stem),
    "r2plus1d_18": (Conv2Plus1D, r2plus1d_stem),
}


def video_resnet(
    name: str,
    *,
    num_classes: int,
    width: int = 64,
    layers: tuple[int, ...] = (2, 2, 2, 2),
    stem_stride: int = 2,
    stem_pool: bool = False,
    temporal_padding: str = "zeros",
) -> VideoResNet:
    """Build "r3d_18" or "r2plus1d_18"; the defaults are torchvision's architecture."""
    if name not in VIDEO_RESNET_SPECS:
        raise ValueError(f"unknown video ResNet {name!r}; choose from {sorted(VIDEO_RESNET_SPECS)}")
    conv_builder, stem = VIDEO_RESNET_SPECS[name]
    return VideoResNet(
        conv_builder=conv_builder,
        stem=stem,
        layers=tuple(layers),
        num_classes=num_classes,
        width=width,
        stem_stride=stem_stride,
        stem_pool=stem_pool,
        temporal_padding=temporal_padding,
    )


def tsn(
    backbone: str,
    *,
    num_classes: int,
    width: int = 64,
    layers: tuple[int, ...] | None = None,
    stem_stride: int = 2,
    stem_pool: bool = True,
) -> TSN:
    """TSN over "resnet18" or "resnet50"; `layers=None` keeps the backbone's own depths."""
    if backbone not in RESNET_2D_SPECS:
        raise ValueError(
            f"unknown TSN backbone {backbone!r}; choose from {sorted(RESNET_2D_SPECS)}"
        )
    block, default_layers = RESNET_2D_SPECS[backbone]
    return TSN(
        block,
        layers=tuple(layers or default_layers),
        num_classes=num_classes,
        width=width,
        stem_stride=stem_stride,
        stem_pool=stem_pool,
    )
