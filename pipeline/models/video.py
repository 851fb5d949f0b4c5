"""Video backbones: R3D-18 and R(2+1)D-18 (torchvision's layout), C3D (RSPNet's, with BatchNorm),
TSN over a 2D ResNet, and a two-branch wrapper (a shared low-level encoder, task-dependent
high-level encoders) for the human-parsing KD method.

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


STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class StagedVideoNet(nn.Module):
    """What the 3D backbones share: five stages named STAGES, a map after the last, its global
    average as the features, a classifier `fc` on them (subclasses build the modules)."""

    memory_format = torch.channels_last_3d

    def feature_map(self, x: Tensor) -> Tensor:
        for stage in STAGES:
            x = getattr(self, stage)(x)
        return x

    def features(self, x: Tensor) -> Tensor:
        return self.feature_map(x).mean(dim=(2, 3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class VideoResNet(StagedVideoNet):
    """torchvision's VideoResNet (BasicBlock) with stage widths (w, 2w, 4w, 8w) and stem options.

    Stages 2-4 stride 2 in time and space, as in torchvision. At width 64, layers (2, 2, 2, 2)
    and the default stem, parameter names equal torchvision's r3d_18 / r2plus1d_18.
    """

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


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class C3D(StagedVideoNet):
    """C3D (Tran et al. 2015) as RSPNet pre-trains it (models/c3d.py): 3x3x3 convolutions with
    BatchNorm, widths (w, 2w, 4w, 8w, 8w), no fully connected layers before the classifier.

    Its five conv groups are named as the ResNets' stages, so one split point serves every
    backbone: stem = conv1 + pool1 (1x2x2, spatial stride `stem_stride`), layer1 = conv2 + pool2,
    layer2 = conv3a/b + pool3, layer3 = conv4a/b + pool4 (pools 2x2x2), layer4 = conv5a/b. At
    width 64 on 16x112x112 clips the feature map is RSPNet's (512, 2, 7, 7).
    """

    def __init__(self, *, num_classes: int, width: int = 64, stem_stride: int = 2) -> None:
        super().__init__()
        pool = nn.MaxPool3d(kernel_size=2, stride=2)
        self.stem = nn.Sequential(
            _conv_bn_relu(3, width),
            nn.MaxPool3d(
                kernel_size=(1, stem_stride, stem_stride), stride=(1, stem_stride, stem_stride)
            ),
        )
        self.layer1 = nn.Sequential(_conv_bn_relu(width, 2 * width), pool)
        self.layer2 = nn.Sequential(
            _conv_bn_relu(2 * width, 4 * width), _conv_bn_relu(4 * width, 4 * width), pool
        )
        self.layer3 = nn.Sequential(
            _conv_bn_relu(4 * width, 8 * width), _conv_bn_relu(8 * width, 8 * width), pool
        )
        self.layer4 = nn.Sequential(
            _conv_bn_relu(8 * width, 8 * width), _conv_bn_relu(8 * width, 8 * width)
        )
        self.feature_dim = 8 * width
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


class BranchedVideoNet(StagedVideoNet):
    """A shared low-level encoder f_l (a backbone's first `shared_stages` of STAGES) feeding
    one task-dependent high-level encoder per backbone (the remaining stages of each
    backbone), as the human-parsing KD method's f_l, h_h, h_c. Each branch comes from its own
    freshly built backbone, so the branches start from independent draws. The representation is
    the concatenation of the branches' pooled maps: feature_dim = branches x the backbone's.
    """

    def __init__(self, backbones: list[nn.Module], *, shared_stages: int, num_classes: int):
        super().__init__()
        if not 1 <= shared_stages < len(STAGES):
            raise ValueError(f"shared_stages must be 1..{len(STAGES) - 1}, got {shared_stages}")
        if len(backbones) < 2:
            raise ValueError(f"a branched network needs >= 2 branches, got {len(backbones)}")
        first = backbones[0]
        self.shared_stages = shared_stages
        self.low = nn.Sequential(*(getattr(first, s) for s in STAGES[:shared_stages]))
        self.high = nn.ModuleList(
            nn.Sequential(*(getattr(b, s) for s in STAGES[shared_stages:])) for b in backbones
        )
        self.branch_dim = first.feature_dim
        self.feature_dim = len(backbones) * first.feature_dim
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.normal_(self.fc.weight, 0, 0.01)
            nn.init.constant_(self.fc.bias, 0)

    def branch_maps(self, x: Tensor) -> list[Tensor]:
        """Each high-level encoder's map of the shared low-level map, in branch order."""
        low = self.low(x)
        return [high(low) for high in self.high]

    def feature_map(self, x: Tensor) -> Tensor:
        return torch.cat(self.branch_maps(x), dim=1)


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
