"""Video-consistent augmentation of Teaching Yourself (Vu et al. 2021, Sec. III-C, Algorithm 1).

Each op fires with probability `p` and, when it fires, applies one random draw to every frame of
the clip, so the augmentation never invents motion. Ops run in the paper's order: flip, contrast,
brightness, hue, Gaussian blur, channel splitting, Gaussian noise. Clips are float (C, T, H, W) in
[0, 1] before normalisation; the output stays in [0, 1].

Parameter ranges follow the authors' code (vdquang1991/Self-KD, util.py) where it gives them:
contrast and brightness factors in [0.5, 1.5], hue shift in [0, 0.1], blur kernel 7 with sigma in
[0.1, 2.0]. Noise std 0.1 is the paper's value (the authors' code used 0.1 on [-1, 1] inputs, i.e.
0.05 on this [0, 1] scale).
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from matplotlib.figure import Figure

from pipeline.io import atomic_path

ALL_OPS = ("flip", "contrast", "brightness", "hue", "blur", "channel_split", "noise")


@dataclass(frozen=True)
class Draw:
    """One op that fired, with the parameters shared by every frame of the clip."""

    op: str
    params: dict

    def label(self) -> str:
        shown = {k: v for k, v in self.params.items() if not isinstance(v, torch.Tensor)}
        values = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
        )
        return f"{self.op}({values})" if values else self.op


def torch_generator(generator: torch.Generator | np.random.Generator) -> torch.Generator:
    """A torch Generator; a numpy one (as the clip loader uses) seeds a fresh torch Generator."""
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator.integers(0, 2**63 - 1)))


def _per_frame(op, video: torch.Tensor, *args) -> torch.Tensor:
    """Run a torchvision image op on every frame, viewing (C, T, H, W) as a batch (T, C, H, W)."""
    return op(video.transpose(0, 1), *args).transpose(0, 1)


def _uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    low, high = bounds
    return low + (high - low) * torch.rand((), generator=generator).item()


class VideoAugment:
    """Random video-consistent augmentation: `VideoAugment(...)(clip, generator) -> clip`.

    `ops` selects which of ALL_OPS may fire (always in ALL_OPS order); `p` is each op's firing
    probability (p = 1 forces the chosen ops on, as the figure does).
    `noise_shared_across_frames` adds one noise image to every frame (the paper: "the noise matrix
    is added to all of the frames"); False draws independent noise per frame as the authors' code
    does.
    """

    def __init__(
        self,
        ops: Sequence[str] = ALL_OPS,
        *,
        p: float = 0.5,
        contrast: tuple[float, float] = (0.5, 1.5),
        brightness: tuple[float, float] = (0.5, 1.5),
        hue: tuple[float, float] = (0.0, 0.1),
        blur_kernel: int = 7,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        noise_std: float = 0.1,
        noise_shared_across_frames: bool = True,
    ):
        unknown = sorted(set(ops) - set(ALL_OPS))
        if unknown:
            raise ValueError(f"unknown augmentation ops {unknown}; choose from {ALL_OPS}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not -0.5 <= hue[0] <= hue[1] <= 0.5:
            raise ValueError(f"hue range must lie in [-0.5, 0.5], got {hue}")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and positive, got {blur_kernel}")
        self.ops = tuple(op for op in ALL_OPS if op in ops)
        self.p = p
        self.contrast = contrast
        self.brightness = brightness
        self.hue = hue
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.noise_std = noise_std
        self.noise_shared_across_frames = noise_shared_across_frames

    def draw(self, shape: Sequence[int], generator: torch.Generator) -> list[Draw]:
        """Decide which ops fire for a clip of `shape` (C, T, H, W) and draw their parameters."""
        channels, frames, height, width = shape
        draws = []
        for op in self.ops:
            if torch.rand((), generator=generator).item() >= self.p:
                continue
            if op == "flip":
                params = {}
            elif op == "contrast":
                params = {"factor": _uniform(self.contrast, generator)}
            elif op == "brightness":
                params = {"factor": _uniform(self.brightness, generator)}
            elif op == "hue":
                params = {"shift": _uniform(self.hue, generator)}
            elif op == "blur":
                params = {"sigma": _uniform(self.blur_sigma, generator)}
            elif op == "channel_split":
                # Two distinct channels, so the op always changes the clip (e.g. RGB -> RGR).
                source, target = torch.randperm(channels, generator=generator)[:2].tolist()
                params = {"source": source, "target": target}
            else:
                noise_frames = 1 if self.noise_shared_across_frames else frames
                noise = torch.randn((channels, noise_frames, height, width), generator=generator)
                params = {"std": self.noise_std, "noise": noise * self.noise_std}
            draws.append(Draw(op, params))
        return draws

    def apply(self, clip: torch.Tensor, draws: Sequence[Draw]) -> torch.Tensor:
        """Apply drawn ops to `clip` (C, T, H, W) in [0, 1]."""
        video = clip
        for draw in draws:
            params = draw.params
            if draw.op == "flip":
                video = TF.horizontal_flip(video)
            elif draw.op == "contrast":
                # torchvision blends each image with its own mean grey; treating the clip as one
                # tall (C, T*H, W) image makes that the clip's mean, so every frame gets the same
                # affine map.
                tall = TF.adjust_contrast(video.flatten(1, 2), params["factor"])
                video = tall.view(video.shape)
            elif draw.op == "brightness":
                video = _per_frame(TF.adjust_brightness, video, params["factor"])
            elif draw.op == "hue":
                video = _per_frame(TF.adjust_hue, video, params["shift"])
            elif draw.op == "blur":
                kernel = [self.blur_kernel, self.blur_kernel]
                video = _per_frame(TF.gaussian_blur, video, kernel, [params["sigma"]] * 2)
            elif draw.op == "channel_split":
                video = video.clone()
                video[params["target"]] = video[params["source"]]
            else:
                noise = params["noise"].to(video.device, video.dtype)
                video = (video + noise).clamp_(0.0, 1.0)
        return video.contiguous()

    def __call__(
        self, clip: torch.Tensor, generator: torch.Generator | np.random.Generator
    ) -> torch.Tensor:
        if clip.ndim != 4 or clip.shape[0] != 3 or not clip.is_floating_point():
            raise ValueError(
                f"expected a float (3, T, H, W) clip, got {clip.dtype} {tuple(clip.shape)}"
            )
        return self.apply(clip, self.draw(clip.shape, torch_generator(generator)))


def _as_float_clip(clip: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (C, T, H, W) in [0, 1]; a float clip is taken as (C, T, H, W)."""
    clip = torch.as_tensor(clip)
    if clip.dtype == torch.uint8:
        return clip.permute(3, 0, 1, 2).float().div(255)
    return clip.float()


def augmentation_figure(
    clip: np.ndarray | torch.Tensor,
    out_png: str | os.PathLike,
    *,
    num_frames: int = 4,
    seed: int = 0,
    augment: VideoAugment | None = None,
) -> None:
    """Grid of `num_frames` frames across time (columns): the original clip, then one row per op
    of `augment` forced on with a seeded draw, labelled with its parameters. An op that is
    video-consistent changes every column of its row in the same way.

    `clip` is uint8 (T, H, W, 3) as decoded, or float (C, T, H, W) in [0, 1].
    """
    augment = augment or VideoAugment()
    video = _as_float_clip(clip)
    columns = (
        np.linspace(0, video.shape[1] - 1, min(num_frames, video.shape[1])).round().astype(int)
    )
    rows = [("original", video)]
    for op in augment.ops:
        forced = VideoAugment(
            (op,),
            p=1.0,
            contrast=augment.contrast,
            brightness=augment.brightness,
            hue=augment.hue,
            blur_kernel=augment.blur_kernel,
            blur_sigma=augment.blur_sigma,
            noise_std=augment.noise_std,
            noise_shared_across_frames=augment.noise_shared_across_frames,
        )
        draws = forced.draw(video.shape, torch.Generator().manual_seed(seed))
        rows.append((draws[0].label(), forced.apply(video, draws)))

    figure = Figure(figsize=(1.8 * len(columns), 1.8 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for row_axes, (label, frames) in zip(axes, rows, strict=True):
        for axis, frame_index in zip(row_axes, columns, strict=True):
            axis.imshow(frames[:, frame_index].permute(1, 2, 0).clamp(0, 1).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
        row_axes[0].set_ylabel(label, fontsize=8)
    for axis, frame_index in zip(axes[0], columns, strict=True):
        axis.set_title(f"frame {frame_index}", fontsize=8)
    with atomic_path(out_png, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)
