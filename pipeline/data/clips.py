"""Clip transforms and the clip Dataset that feeds the trainer (README.md, "Shards").

Transforms work on uint8 (T, H, W, 3) arrays and apply the same crop/flip to every frame of a clip.
Every random draw of an item comes from a Generator seeded by (seed, epoch, position), so items do
not depend on DataLoader worker count or order.
"""

import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.data.shards import ShardStore
from pipeline.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_fits(clip: np.ndarray, size: int) -> None:
    height, width = clip.shape[1:3]
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds the {height}x{width} frames")


def crop(clip: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return clip[:, top : top + size, left : left + size]


def random_crop(clip: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    _check_fits(clip, size)
    height, width = clip.shape[1:3]
    top = int(rng.integers(0, height - size + 1))
    return crop(clip, top, int(rng.integers(0, width - size + 1)), size)


def center_crop(clip: np.ndarray, size: int) -> np.ndarray:
    _check_fits(clip, size)
    height, width = clip.shape[1:3]
    return crop(clip, (height - size) // 2, (width - size) // 2, size)


def three_crop(clip: np.ndarray, size: int) -> list[np.ndarray]:
    """Start, centre and end crops along the long side (left/centre/right or top/centre/bottom)."""
    _check_fits(clip, size)
    height, width = clip.shape[1:3]
    if width >= height:
        top = (height - size) // 2
        return [crop(clip, top, left, size) for left in (0, (width - size) // 2, width - size)]
    left = (width - size) // 2
    return [crop(clip, top, left, size) for top in (0, (height - size) // 2, height - size)]


def random_hflip(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return clip[:, :, ::-1] if rng.random() < 0.5 else clip


def to_unit_float(clip: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (C, T, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float().div_(255)


def normalise(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std of a (C, T, H, W) clip in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
    return video.sub_(mean_t).div_(std_t)


def to_tensor(clip: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (C, T, H, W), scaled to [0, 1] then normalised per channel."""
    return normalise(to_unit_float(clip), mean, std)


def to_uint8_tensor(clip: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (C, T, H, W): the loader's item, normalised later per batch."""
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).contiguous()


def prepare_video(video: torch.Tensor) -> torch.Tensor:
    """A batch's "video" as the model takes it: uint8 pixels become float32 normalised with the
    ImageNet statistics (on whatever device the batch is on); float videos are already normalised.

    Why batches travel as uint8: per clip, converting and normalising costs more than reading the
    frames (`python -m pipeline bench train`); once per batch it is cheap, on a GPU nearly free,
    and a uint8 batch is a quarter of the bytes to collate, pin and copy.
    """
    if video.dtype != torch.uint8:
        return video
    shape = [1] * video.dim()
    shape[-4] = 3  # channels: (..., C, T, H, W)
    mean = torch.tensor(IMAGENET_MEAN, device=video.device).mul_(255).view(shape)
    std = torch.tensor(IMAGENET_STD, device=video.device).mul_(255).view(shape)
    return video.float().sub_(mean).div_(std)


def select_rows(
    manifest: pd.DataFrame, split_col: str, split: str, labeled_percent: int | None = None
) -> np.ndarray:
    """Manifest row numbers in `split` ("train" | "test") of `split_col` ("split1"...), optionally
    restricted to the `labeled_<percent>` subset."""
    columns = [split_col] if labeled_percent is None else [split_col, f"labeled_{labeled_percent}"]
    missing = [column for column in columns if column not in manifest.columns]
    if missing:
        raise ValueError(f"manifest has no column {missing[0]!r} (has {list(manifest.columns)})")
    keep = manifest[split_col].to_numpy() == split
    if labeled_percent is not None:
        keep &= manifest[columns[1]].to_numpy(bool)
    return np.flatnonzero(keep).astype(np.int64)


class ClipDataset(torch.utils.data.Dataset):
    """Clips of manifest rows `rows` as the contract's dict {"video", "label", "index", "frames"}.

    `sampler` gives (T,) or (V, T) frame indices; (V, T) or three_crop give "video" (V, C, T, H, W).
    "video" is uint8 pixels (made model-ready per batch by `prepare_video`, as the trainer and the
    evaluator do), or float32 already normalised when there is an `augment` or non-ImageNet
    mean/std. Items are indexed by position, or by (epoch, position), which lets persistent
    DataLoader workers (pipeline.train.make_loader) draw each epoch's crops without `set_epoch`.
    Training crops each view at random and (with `flip`) flips it with p = 0.5; `augment`, if
    given, is called as augment(clip, rng) on each training view in [0, 1] (C, T, H, W) before
    normalisation (e.g. pipeline.data.augment.VideoAugment). Testing centre-crops, or with
    `three_crop` takes three crops along the long side (views clip-major: clip 0's three crops
    first). `label_mask` (bool per manifest row) marks labeled videos; others get label -1.
    Call `set_epoch` before each epoch when indexing by position.
    """

    epoch_keys = True  # takes (epoch, position) keys: see pipeline.train.make_loader

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        *,
        rows: Sequence[int] | np.ndarray,
        sampler: Callable[[int, np.random.Generator], np.ndarray],
        crop_size: int,
        train: bool,
        three_crop: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        label_mask: np.ndarray | None = None,
        flip: bool = True,
        augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
    ):
        if train and three_crop:
            raise ValueError("three_crop is a test-time view; use it with train=False")
        self.store = ShardStore(shard_dir)
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(self.store)):
            raise ValueError(f"rows outside the manifest's {len(self.store)} videos")
        if label_mask is not None and len(label_mask) != len(self.store):
            raise ValueError(f"label_mask has {len(label_mask)} entries for {len(self.store)} rows")
        used = self.store.manifest.iloc[self.rows]
        if len(used) and crop_size > min(used["height"].min(), used["width"].min()):
            smallest = int(min(used["height"].min(), used["width"].min()))
            raise DataError(
                f"{shard_dir}: crop {crop_size} exceeds the frames' smallest side ({smallest} px): "
                "lower the crop in params.yaml (clips.crop, dtg.crop or dtg.finetune_clips.crop)"
            )
        labels = self.store.labels
        self.labels = labels if label_mask is None else np.where(label_mask, labels, -1)
        self.sampler = sampler
        self.crop_size = crop_size
        self.train = train
        self.three_crop = three_crop
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.seed = seed
        self.flip = flip
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _views(self, clip: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        if self.train:
            view = random_crop(clip, self.crop_size, rng)
            return [random_hflip(view, rng) if self.flip else view]
        if self.three_crop:
            return three_crop(clip, self.crop_size)
        return [center_crop(clip, self.crop_size)]

    def _tensor(self, view: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        augment = self.train and self.augment is not None
        if not augment and (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
            return to_uint8_tensor(view)
        video = to_unit_float(view)
        if augment:
            video = self.augment(video, rng)
        return normalise(video, self.mean, self.std)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        row = int(self.rows[position])
        rng = np.random.default_rng([self.seed, epoch, position])
        frames = self.sampler(self.store.num_frames(row), rng)
        single = frames.ndim == 1 and not self.three_crop
        frames = frames.reshape(-1, frames.shape[-1])
        decoded = self.store.read_clip(row, frames)
        clips = decoded.reshape(*frames.shape, *decoded.shape[1:])
        views = [view for clip in clips for view in self._views(clip, rng)]
        video = torch.stack([self._tensor(view, rng) for view in views])
        frames = torch.from_numpy(np.repeat(frames, len(views) // len(frames), axis=0))
        return {
            "video": video[0] if single else video,
            "label": int(self.labels[row]),
            "index": row,
            "frames": frames[0] if single else frames,
        }
