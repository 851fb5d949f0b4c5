"""Oracle and noise-teacher checks shared by every distillation method's tests.

A method is shown to work, not assumed to: guided by a teacher whose output carries the class
label (a fixed random projection of the one-hot label, plus noise), a student's linear probe must
rise far above its random initialisation's; guided by a teacher of pure noise, it must not.

The videos are drifting grey gratings whose orientation is the class, under random brightness and
contrast, spatial frequency, drift and pixel noise: a random network's features hold the
orientation only weakly (brightness and contrast dominate them), while a network trained towards
the label learns to see through them within a few hundred steps. Small enough for CI; the
synthetic action world is too hard for a tiny student to generalise from a few hundred videos in
that time, so it could not tell a working method from a broken one.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.clips import ClipDataset
from pipeline.data.samplers import UniformClipsSampler
from pipeline.evaluate import calibrate_batchnorm, linear_probe
from pipeline.figures import extract_features
from pipeline.train import make_loader
from tests.test_clips import write_test_shards

CLASSES = 6
VIDEOS = 180  # write_test_shards: two thirds train, one third test
FRAMES, SIZE = 8, 32


def grating_video(label: int, rng: np.random.Generator) -> np.ndarray:
    """(FRAMES, SIZE, SIZE, 3) uint8: a grating at the class's orientation, drifting."""
    angle = np.pi * label / CLASSES + rng.uniform(-0.08, 0.08)
    freq, speed, phase = rng.uniform(0.12, 0.3), rng.uniform(-0.6, 0.6), rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[:SIZE, :SIZE]
    along = x * np.cos(angle) + y * np.sin(angle)
    t = np.arange(FRAMES)[:, None, None]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * along[None] + speed * t + phase)
    fg, bg = np.full(3, rng.uniform(0, 255)), np.full(3, rng.uniform(0, 255))
    frames = bg + wave[..., None] * (fg - bg) + rng.normal(0, 20, (FRAMES, SIZE, SIZE, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


def make_oracle_shards(out_dir: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = [(v // 3) % CLASSES for v in range(VIDEOS)]  # every class in train and test
    videos = [grating_video(label, rng) for label in labels]
    names = tuple(f"Angle{k * 180 // CLASSES}" for k in range(CLASSES))
    return write_test_shards(out_dir, videos, labels, class_names=names, num_shards=1)


class TableCache:
    """FeatureCache's interface (read, feature_dim) over one (num_frames, D) array per row."""

    def __init__(self, table: list[np.ndarray]):
        self.table = table
        self.feature_dim = table[0].shape[1]

    def read(self, row: int, frame_indices) -> dict:
        return {"embedding": self.table[row][np.asarray(frame_indices)]}


def _manifest(shard_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(shard_dir / "manifest.parquet")


def oracle_cache(shard_dir: Path, dim: int = 16, noise: float = 0.5, seed: int = 0) -> TableCache:
    """Every frame's embedding: a fixed random projection of its video's one-hot label, plus
    Gaussian noise of std `noise` per entry."""
    manifest = _manifest(shard_dir)
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((CLASSES, dim))
    return TableCache(
        [
            (codes[label] + noise * rng.standard_normal((frames, dim))).astype(np.float32)
            for label, frames in zip(manifest["label"], manifest["num_frames"], strict=True)
        ]
    )


class NoiseCache:
    """A teacher of pure noise: every read draws fresh Gaussian embeddings (seeded by the read,
    so runs stay reproducible), unrelated to the video or to any earlier read.

    Noise fixed per frame would not do: averaged over a clip's frames it is a code that stays the
    same for each video, an instance-discrimination target, which lifted the probe from 28.3% to
    43.3% here (measured): the student learns from telling videos apart, not from a teacher."""

    def __init__(self, dim: int = 16, seed: int = 0):
        self.feature_dim = dim
        self.seed = seed

    def read(self, row: int, frame_indices) -> dict:
        frames = np.asarray(frame_indices).ravel().tolist()
        rng = np.random.default_rng([self.seed, row, *frames])
        return {"embedding": rng.standard_normal((len(frames), self.feature_dim), np.float32)}


def noise_cache(shard_dir: Path, dim: int = 16, seed: int = 0) -> NoiseCache:
    return NoiseCache(dim, seed)


def split_rows(shard_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    split = _manifest(shard_dir)["split1"].to_numpy()
    return np.flatnonzero(split == "train"), np.flatnonzero(split == "test")


def student_probe(model: torch.nn.Module, shard_dir: Path, *, frames: int = 4) -> float:
    """Linear-probe test top-1 (percent) of `model`'s frozen features, fitted on the train
    videos (2 uniform clips each) after BatchNorm calibration on them, scored on the test videos."""

    def loader(rows):
        dataset = ClipDataset(shard_dir, rows=rows, sampler=UniformClipsSampler(2, frames, 2),
                              crop_size=SIZE, train=False)  # fmt: skip
        return make_loader(dataset, batch_size=32, shuffle=False, seed=0, distributed=False)

    train, test = split_rows(shard_dir)
    calibrate_batchnorm(model, loader(train))
    return linear_probe(
        extract_features(model, loader(train)), extract_features(model, loader(test))
    )["top1"]


class OrientationOracle(torch.nn.Module):
    """A near-perfect classifier teacher for the grating world (TimeBalance's students distil
    class scores, not features): it reads the grating's orientation off the clip (the dominant
    gradient direction of the structure tensor summed over the smoothed frames; drift does not
    change it) and gives that class a logit of `margin`."""

    def __init__(self, margin: float = 10.0):
        super().__init__()
        self.margin = margin

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.float().mean(dim=1)  # (B, T, H, W), channels averaged
        frames = torch.nn.functional.avg_pool2d(frames, 3, stride=1)  # against the pixel noise
        gy, gx = frames.diff(dim=2)[..., :-1], frames.diff(dim=3)[..., :-1, :]
        jxx, jyy, jxy = ((a * b).sum((1, 2, 3)) for a, b in ((gx, gx), (gy, gy), (gx, gy)))
        angle = 0.5 * torch.atan2(2 * jxy, jxx - jyy)  # the grating's "along" direction
        label = torch.round(angle / (np.pi / CLASSES)).long() % CLASSES
        return self.margin * torch.nn.functional.one_hot(label, CLASSES).float()


class NoiseTeacher(torch.nn.Module):
    """A classifier teacher of pure noise: fresh random logits at every call (seeded)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return 3 * torch.randn(len(video), CLASSES, generator=self.generator)


ORACLE_LIFT = 20.0  # percentage points above random init that an oracle teacher must give
NOISE_BAND = 10.0  # a noise teacher must stay below random init + this
