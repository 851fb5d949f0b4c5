"""SCHP's human parser (AugmentCE2P on ResNet-101) in plain PyTorch, for its official checkpoints.

Self-Correction for Human Parsing (Li et al.; code: GoGoDuck912/Self-Correction-Human-Parsing,
networks/AugmentCE2P.py) normalises with InPlaceABNSync, a compiled CUDA op that fuses BatchNorm
and an activation. Here it is BatchNorm2d followed by LeakyReLU(0.01) (its default activation),
or BatchNorm2d alone where the original is built with activation='none' (the whole ResNet
backbone, which applies a plain ReLU after it). Module and parameter names equal the original's
(including its `fushion` spelling), so an official `state_dict`, once its `module.` prefix is
stripped, loads with strict=True. InPlaceABN keeps no `num_batches_tracked`; BatchNorm2d fills
it in when a state dict without it is loaded.

Official preprocessing (the label sets below): BGR, mean (0.406, 0.456, 0.485), std (0.225,
0.224, 0.229) in BGR order, an aspect-kept affine warp of the person box to 473x473 (LIP) or
512x512 (ATR, Pascal-Person-Part), and the fused output read from `output[0][-1]`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, conv1x1, conv3x3

LEAKY_SLOPE = 0.01  # InPlaceABNSync's default leaky_relu slope

# (input size, class names) of SCHP's three official checkpoints, as in its simple_extractor.py
SCHP_LABEL_SETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "lip": (
        473,
        (
            "Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat",
            "Socks", "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
            "Left-leg", "Right-leg", "Left-shoe", "Right-shoe",
        ),
    ),
    "atr": (
        512,
        (
            "Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress",
            "Belt", "Left-shoe", "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm",
            "Right-arm", "Bag", "Scarf",
        ),
    ),
    "pascal": (
        512,
        ("Background", "Head", "Torso", "Upper Arms", "Lower Arms", "Upper Legs", "Lower Legs"),
    ),
}  # fmt: skip


class BatchNormLeakyReLU(nn.BatchNorm2d):
    """InPlaceABNSync with its default activation: one module, so parameter names match."""

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(super().forward(x), LEAKY_SLOPE)


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 1) -> list[nn.Module]:
    """Conv (no bias) + InPlaceABNSync: the unit every SCHP head is made of."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        BatchNormLeakyReLU(out_channels),
    ]


def upsample_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # as the original


class PyramidPooling(nn.Module):
    """PSP context module on the last backbone stage (2048 -> 512 channels)."""

    def __init__(self, in_channels: int = 2048, out_channels: int = 512, sizes=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), *conv_bn_act(in_channels, out_channels))
            for size in sizes
        )
        self.bottleneck = nn.Sequential(
            *conv_bn_act(in_channels + len(sizes) * out_channels, out_channels, kernel_size=3)
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        priors = [upsample_to(stage(x), size) for stage in self.stages]
        return self.bottleneck(torch.cat([*priors, x], dim=1))


class EdgeBranch(nn.Module):
    """Edge prediction from layers 1-3; its 3x256 features feed the fusion head."""

    def __init__(self, in_channels=(256, 512, 1024), mid_channels: int = 256, out_channels=2):
        super().__init__()
        self.conv1 = nn.Sequential(*conv_bn_act(in_channels[0], mid_channels))
        self.conv2 = nn.Sequential(*conv_bn_act(in_channels[1], mid_channels))
        self.conv3 = nn.Sequential(*conv_bn_act(in_channels[2], mid_channels))
        self.conv4 = nn.Conv2d(mid_channels, out_channels, 3, padding=1)  # shared by all scales
        self.conv5 = nn.Conv2d(3 * out_channels, out_channels, 1)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> tuple[Tensor, Tensor]:
        size = x1.shape[-2:]
        features = [self.conv1(x1), self.conv2(x2), self.conv3(x3)]
        # edges at each scale's own resolution, then everything upsampled to layer1's
        edges = [upsample_to(self.conv4(f), size) for f in features]
        features = [upsample_to(f, size) for f in features]
        return self.conv5(torch.cat(edges, dim=1)), torch.cat(features, dim=1)


class ParsingDecoder(nn.Module):
    """Context features upsampled to layer1's resolution and fused with its low-level features."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Sequential(*conv_bn_act(512, 256))
        self.conv2 = nn.Sequential(*conv_bn_act(256, 48))
        self.conv3 = nn.Sequential(*conv_bn_act(304, 256), *conv_bn_act(256, 256))
        self.conv4 = nn.Conv2d(256, num_classes, 1)

    def forward(self, context: Tensor, low_level: Tensor) -> tuple[Tensor, Tensor]:
        context = upsample_to(self.conv1(context), low_level.shape[-2:])
        x = self.conv3(torch.cat([context, self.conv2(low_level)], dim=1))
        return self.conv4(x), x


class SCHPNet(nn.Module):
    """AugmentCE2P: deep-stem ResNet-101 (output stride 16), PSP context, edge and parsing
    branches, and a fusion head whose logits are SCHP's prediction.

    `features_and_parts(x)` returns the fusion head's 256-d hidden layer, globally averaged (the
    parser's penultimate layer, as `features` is for the classifiers), and the fused part logits
    at 1/4 of the input resolution.
    """

    feature_dim = 256

    def __init__(self, num_classes: int, layers=(3, 4, 23, 3)):
        super().__init__()
        # deep stem; the backbone's InPlaceABNSync are activation='none' followed by a ReLU
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = conv3x3(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = 128
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=2)  # stride 1, dilated

        self.context_encoding = PyramidPooling(2048, 512)
        self.edge = EdgeBranch()
        self.decoder = ParsingDecoder(num_classes)
        self.fushion = nn.Sequential(
            *conv_bn_act(1024, 256), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1)
        )
        self.num_classes = num_classes

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1):
        # torchvision's Bottleneck has SCHP's names and order (stride on the 3x3 conv)
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        stage = [Bottleneck(self.inplanes, planes, stride, downsample, dilation=dilation)]
        self.inplanes = planes * Bottleneck.expansion
        stage += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def features_and_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, H, W) normalised BGR -> ((N, 256) pooled features, (N, C, H/4, W/4) logits)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(F.relu(self.bn3(self.conv3(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        context = self.context_encoding(self.layer4(x3))
        _, parsing_features = self.decoder(context, x1)  # its own logits are an auxiliary output
        _, edge_features = self.edge(x1, x2, x3)
        hidden = self.fushion[:3](torch.cat([parsing_features, edge_features], dim=1))
        return hidden.mean(dim=(2, 3)), self.fushion[3](hidden)

    def forward(self, x: Tensor) -> Tensor:
        """The fused parsing logits (N, C, H/4, W/4): SCHP's prediction."""
        return self.features_and_parts(x)[1]


def build_schp(num_classes: int) -> SCHPNet:
    """SCHP's AugmentCE2P-ResNet-101 with `num_classes` parts (LIP 20, ATR 18, Pascal 7)."""
    if num_classes < 2:
        raise ValueError(f"SCHP needs at least 2 classes, got {num_classes}")
    return SCHPNet(num_classes)
