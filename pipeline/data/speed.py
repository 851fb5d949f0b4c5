"""The human-parsing KD method's training items: RSPNet's speed pairs plus the parsing teacher's
part map of the query clip's middle frame, under the query's own crop and flip.

Per video (RSPNet's pretrain code with speeds {1, 2}): a query clip of T frames at speed 1 or 2
(drawn per item) from a random start, and a key window of 2T consecutive frames from another
random start, seen at 1x (its first T frames) and at 2x (every second frame) under one crop,
flip and colour draw. The motion task ranks the key at the query's speed above the other; the
appearance task takes either as a positive.

The part maps come from the feature cache (pipeline.teachers.features: the teacher's softmax of
the centre square of each stored frame, at parts_size x parts_size). Spatial alignment (spec
section 5, choice 4): the query is cropped inside that square, and its map is the cached map
resampled over the same box (torchvision's roi_align: bilinear, area-averaged when shrinking)
and flipped with the query; a flip also swaps the Left-* / Right-* parts of LIP / ATR label sets.
"""

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision.ops import roi_align

from pipeline.data.clips import ClipDataset, crop
from pipeline.errors import DataError


def left_right_swap(class_names: Sequence[str]) -> list[int]:
    """The channel permutation a horizontal flip applies to a part map: each "Left-x" channel
    takes "Right-x"'s place and back (LIP, ATR); other parts keep theirs (all of Pascal's)."""
    index = {name: i for i, name in enumerate(class_names)}
    swap = []
    for name in class_names:
        if name.startswith("Left-"):
            name = "Right-" + name.removeprefix("Left-")
        elif name.startswith("Right-"):
            name = "Left-" + name.removeprefix("Right-")
        if name not in index:
            raise ValueError(f"part {name!r} has no mirror in {list(class_names)}")
        swap.append(index[name])
    return swap


def crop_and_flip_parts(
    parts: torch.Tensor,
    box: tuple[float, float, float],
    *,
    flip: bool,
    swap: Sequence[int],
    size: int,
) -> torch.Tensor:
    """A (C, s, s) map over the teacher's square -> (C, size, size) over `box` = (top, left,
    side) as fractions of that square, mirrored (and Left/Right parts swapped) when `flip`.
    Bilinear resampling keeps every position a probability distribution."""
    side = parts.shape[-1]
    top, left, extent = (value * side for value in box)
    rois = parts.new_tensor([[0.0, left, top, left + extent, top + extent]])
    out = roi_align(parts[None].float(), rois, output_size=size, aligned=True)[0]
    return out.flip(-1)[list(swap)] if flip else out


class SpeedSampler:
    """Frame indices of one item: the query's T frames at speed 1 or 2 (p = 0.5 each), then the
    key window's 2T consecutive frames; the query's speed is its stride."""

    def __init__(self, frames: int):
        if frames < 2:
            raise ValueError(f"clips need >= 2 frames to have a speed, got {frames}")
        self.frames = frames

    def __call__(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        span = 2 * self.frames
        if num_frames < span:
            raise DataError(f"a video of {num_frames} frames is shorter than the 2x key window "
                            f"({span} frames): lower hpkd.clip_frames")  # fmt: skip
        speed = int(rng.integers(1, 3))
        start = int(rng.integers(0, num_frames - speed * self.frames + 1))
        query = start + speed * np.arange(self.frames)
        window = int(rng.integers(0, num_frames - span + 1)) + np.arange(span)
        return np.concatenate([query, window])


class SpeedPairDataset(ClipDataset):
    """Items {"video": (C, T, H, W) query, "speed": 0 (1x) | 1 (2x), "keys": (2, C, T, H, W) the
    key window at 1x and 2x, "parts": (C_parts, size, size) (with `parts`), "label", "index"}.

    parts: a feature cache (anything with read(row, frames) -> {"parts": (n, C, s, s)}) of the
    parsing teacher; swap: left_right_swap of its class names; parts_out: the target map side.
    `augment` (pipeline.data.augment.VideoAugment) is drawn once for the query and once for the
    key window; `flip` flips each with p = 0.5.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        *,
        rows: Sequence[int] | np.ndarray,
        frames: int,
        crop_size: int,
        seed: int = 0,
        flip: bool = False,
        augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
        parts=None,
        swap: Sequence[int] | None = None,
        parts_out: int = 8,
    ):
        super().__init__(shard_dir, rows=rows, sampler=SpeedSampler(frames), crop_size=crop_size,
                         train=True, seed=seed, flip=flip, augment=augment)  # fmt: skip
        if parts is not None and swap is None:
            raise ValueError("part maps need the flip's channel permutation (left_right_swap)")
        self.labels = np.full_like(self.labels, -1)  # pre-training never sees a label
        self.frames = frames
        self.parts = parts
        self.swap = swap
        self.parts_out = parts_out

    def _query_view(self, clip: np.ndarray, rng: np.random.Generator):
        """A random crop inside the centre square the teacher saw, maybe flipped; its box as
        fractions of that square."""
        height, width = clip.shape[1:3]
        side = min(height, width)
        if self.crop_size > side:
            raise DataError(f"crop {self.crop_size} exceeds the frames' {side} px side (hpkd.crop)")
        top = int(rng.integers(0, side - self.crop_size + 1))
        left = int(rng.integers(0, side - self.crop_size + 1))
        view = crop(clip, (height - side) // 2 + top, (width - side) // 2 + left, self.crop_size)
        flipped = self.flip and bool(rng.random() < 0.5)
        box = (top / side, left / side, self.crop_size / side)
        return (view[:, :, ::-1] if flipped else view), box, flipped

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        row = int(self.rows[position])
        rng = np.random.default_rng([self.seed, epoch, position])
        drawn = self.sampler(self.store.num_frames(row), rng)
        query_frames = drawn[: self.frames]
        decoded = self.store.read_clip(row, drawn)
        view, box, flipped = self._query_view(decoded[: self.frames], rng)
        window = self._tensor(self._views(decoded[self.frames :], rng)[0], rng)
        item = {
            "video": self._tensor(view, rng),
            "speed": int(query_frames[1] - query_frames[0]) - 1,
            "keys": torch.stack([window[:, : self.frames], window[:, ::2]]),
            "label": int(self.labels[row]),
            "index": row,
        }
        if self.parts is not None:
            middle = int(query_frames[self.frames // 2])
            parts = torch.from_numpy(self.parts.read(row, [middle])["parts"][0])
            item["parts"] = crop_and_flip_parts(parts, box, flip=flipped, swap=self.swap,
                                                size=self.parts_out)  # fmt: skip
        return item
