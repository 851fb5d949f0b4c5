"""TimeBalance's self-supervised items: n local clips of a video, each under A augmentations, and
the global clip that covers them (spec ../shared/specs/timebalance.md (a), sampling).

The authors draw 4 back-to-back 16-frame clips at a random start in a >= 64-frame video and a
16-frame global clip at stride 4 over the same span. The synthetic world's videos are 32 frames,
so here the n local clips come from n consecutive windows covering the video
(`MultiClipSampler`: a random dense clip per window in training, the centred one in testing) and
the global clip spreads `global_frames` frames evenly over the whole video: its t-th temporal
slice (pipeline.methods.timebalance.temporal_slices) covers local clip t's window, which is what
the global-local loss L_D2 pairs. With 8-frame clips, n = 4 and a 32-frame global clip the windows
are the clips, as in the paper.
"""

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.data.clips import ClipDataset
from pipeline.data.samplers import MultiClipSampler
from pipeline.errors import DataError


class MultiClipDataset(ClipDataset):
    """Items {"video": (A, n, C, T, H, W), "global": (A_g, C, T_g, H, W) (only when A_g > 0),
    "label", "index", "frames": (n, T) local frame indices, "global_frames": (T_g,)}.

    video[a, t] is augmentation a of local clip t, in time order; every clip of every
    augmentation gets its own random crop (and flip, with `flip`) in training, the centre crop in
    testing. `augment` (e.g. pipeline.data.augment.VideoAugment) is drawn per clip as well. Each
    frame is read once per item, whatever the number of views.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        *,
        rows: Sequence[int] | np.ndarray,
        num_clips: int,
        clip_frames: int,
        stride: int,
        global_frames: int,
        augmentations: int,
        global_augmentations: int,
        crop_size: int,
        train: bool,
        seed: int = 0,
        flip: bool = False,
        augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
        label_mask: np.ndarray | None = None,
    ):
        if augmentations < 1 or global_augmentations < 0 or global_frames < 1:
            raise ValueError(
                "augmentations must be >= 1, global_augmentations >= 0, global_frames >= 1"
            )
        super().__init__(
            shard_dir,
            rows=rows,
            sampler=MultiClipSampler(num_clips, clip_frames, stride, train),
            crop_size=crop_size,
            train=train,
            seed=seed,
            flip=flip,
            augment=augment,
            label_mask=label_mask,
        )
        shortest = int(self.store.manifest["num_frames"].iloc[self.rows].min()) if len(self) else 0
        if len(self) and shortest < num_clips:
            raise DataError(
                f"{shard_dir}: a video of {shortest} frames cannot give {num_clips} local clips "
                "(timebalance.ssl.num_clips)"
            )
        self.augmentations = augmentations
        self.global_augmentations = global_augmentations
        self.global_frames = global_frames

    def _views_of(self, clips: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """(V, T, H, W, 3) frames -> (V, C, T, h, w): one view of each clip."""
        return torch.stack([self._tensor(self._views(clip, rng)[0], rng) for clip in clips])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        row = int(self.rows[position])
        rng = np.random.default_rng([self.seed, epoch, position])
        num_frames = self.store.num_frames(row)
        local = self.sampler(num_frames, rng)  # (n, T)
        spread = np.linspace(0, num_frames - 1, self.global_frames).round().astype(np.int64)
        wanted = np.concatenate([local.ravel(), spread]) if self.global_augmentations else local
        decoded = self.store.read_clip(row, wanted)  # each distinct frame read once
        clips = decoded[: local.size].reshape(*local.shape, *decoded.shape[1:])
        item = {
            "video": torch.stack([self._views_of(clips, rng) for _ in range(self.augmentations)]),
            "label": int(self.labels[row]),
            "index": row,
            "frames": torch.from_numpy(local),
            "global_frames": torch.from_numpy(spread),
        }
        if self.global_augmentations:
            whole = np.repeat(decoded[None, local.size :], self.global_augmentations, axis=0)
            item["global"] = self._views_of(whole, rng)
        return item
