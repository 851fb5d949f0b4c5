"""DTG-Net's training items: the student's anchor clip plus the teachers' cached guidance.

Per video, PairSampler(SegmentSampler(T, train=True), overlap) draws two sparse sequences (one
random frame in each of T segments): the anchor, which is decoded from the shards and becomes the
item's "video" (random crop and flip, as ClipDataset trains), and the guidance, which is never
decoded: its teachers' per-frame embeddings are read from the feature cache
(pipeline.teachers.features.FeatureCache, or anything with the same `read` / `feature_dim`).

Teacher input (DTG-Net Table 2):
  "seq": the mean of the guidance sequence's T per-frame embeddings;
  "img": the embedding of one frame of the guidance sequence, chosen at random (from the item's
         seeded generator) among its T frames, i.e. a random frame of a random segment: "img is
         any frame in a video" in the paper's words, not always the same middle part.
The teachers saw whole frames (the cache holds one output per stored frame), so the guidance has
no crop augmentation, unlike the paper's cropped teacher input; the anchor is cropped and flipped.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pipeline.data.clips import IMAGENET_MEAN, IMAGENET_STD, ClipDataset
from pipeline.data.samplers import PairSampler, SegmentSampler

GUIDANCE_INPUTS = ("img", "seq")


class AnchorOfPair:
    """ClipDataset's sampler for DTG: draws the (anchor, guidance) pair, returns the anchor.

    ClipDataset decodes whatever its sampler returns, and only the anchor needs decoding; the
    guidance frames of the latest draw are kept in `guidance` for the dataset to read from the
    cache. DataLoader workers are processes that run items one at a time, so the latest draw is
    the current item's.
    """

    def __init__(self, pair: PairSampler, single_frame: bool):
        self.pair = pair
        self.single_frame = single_frame
        self.guidance: np.ndarray | None = None

    def __call__(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        anchor, guidance = self.pair(num_frames, rng)
        if self.single_frame:
            pick = int(rng.integers(len(guidance)))
            guidance = guidance[pick : pick + 1]
        self.guidance = guidance
        return anchor


class GuidedClipDataset(ClipDataset):
    """ClipDataset items of the anchor sequence plus "guidance": {teacher: float32 (D_k,)} and
    "guidance_frames": int64 (T,) ("seq") or (1,) ("img"), the frames the guidance came from.

    caches: teacher name -> a feature cache of these shards; `segments` = T frames per sequence;
    overlap: see PairSampler. Items depend only on (seed, epoch, position), as ClipDataset's.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        *,
        rows: Sequence[int] | np.ndarray,
        caches: Mapping,
        segments: int,
        crop_size: int,
        guidance: str = "seq",
        overlap: bool = True,
        seed: int = 0,
        label_mask: np.ndarray | None = None,
        flip: bool = True,
        augment=None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if guidance not in GUIDANCE_INPUTS:
            raise ValueError(f"guidance must be one of {GUIDANCE_INPUTS}, got {guidance!r}")
        if not caches:
            raise ValueError("GuidedClipDataset needs at least one teacher cache")
        pair = PairSampler(SegmentSampler(segments, train=True), overlap)
        super().__init__(
            shard_dir,
            rows=rows,
            sampler=AnchorOfPair(pair, single_frame=guidance == "img"),
            crop_size=crop_size,
            train=True,
            seed=seed,
            label_mask=label_mask,
            flip=flip,
            augment=augment,
            mean=mean,
            std=std,
        )
        self.caches = dict(caches)
        self.guidance_input = guidance

    @property
    def feature_dims(self) -> dict[str, int]:
        """Teacher name -> embedding size D_k (what DTG's `teachers` argument takes)."""
        return {name: int(cache.feature_dim) for name, cache in self.caches.items()}

    def guidance(self, row: int, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """Each teacher's mean embedding over `frames` of manifest row `row`, float32 (D_k,)."""
        return {
            name: torch.from_numpy(
                np.asarray(cache.read(row, frames)["embedding"], np.float32).mean(axis=0)
            )
            for name, cache in self.caches.items()
        }

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        item = super().__getitem__(key)  # a position, or (epoch, position): see ClipDataset
        frames = self.sampler.guidance
        item["guidance"] = self.guidance(item["index"], frames)
        item["guidance_frames"] = torch.from_numpy(frames.astype(np.int64))
        return item
