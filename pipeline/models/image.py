"""2D ResNets in torchvision's layout, with width and depth knobs for tiny inputs.

At width 64 with the default depths the parameter names equal torchvision's resnet18 / resnet50,
so ImageNet (or Places365, after stripping `module.`) state dicts load with strict=True.
"""

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

RESNET_2D_SPECS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ImageResNet(nn.Module):
    """torchvision's ResNet with stage widths (w, 2w, 4w, 8w) and a configurable stem.

    `stem_stride` and `stem_pool` let 32-48 px images keep a usable resolution in the last stage
    (torchvision: stride 2 and a 3x3/2 max-pool, i.e. 32x downsampling overall).
    num_classes=0 replaces the classifier by an identity, so forward returns `features`.
    """

    # conv weights are 4-D: channels_last is this model's fast layout on CUDA
    memory_format = torch.channels_last

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        *,
        layers: tuple[int, ...],
        num_classes: int,
        width: int = 64,
        stem_stride: int = 2,
        stem_pool: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_pool else nn.Identity()
        )
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.feature_dim = 8 * width * block.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, feature_dim, h, w) last-stage map, before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, feature_dim) globally average-pooled penultimate features."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def resnet_2d(
    name: str,
    *,
    num_classes: int,
    width: int = 64,
    layers: tuple[int, ...] | None = None,
    stem_stride: int = 2,
    stem_pool: bool = True,
) -> ImageResNet:
    """Build "resnet18" or "resnet50"; `layers=None` keeps the architecture's own depths."""
    if name not in RESNET_2D_SPECS:
        raise ValueError(f"unknown 2D ResNet {name!r}; choose from {sorted(RESNET_2D_SPECS)}")
    block, default_layers = RESNET_2D_SPECS[name]
    return ImageResNet(
        block,
        layers=tuple(layers or default_layers),
        num_classes=num_classes,
        width=width,
        stem_stride=stem_stride,
        stem_pool=stem_pool,
    )
