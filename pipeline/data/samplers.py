"""Frame-index samplers: which frames of a video make a clip (PyTorchVideo style, one job each).

Every sampler is called as `sampler(num_frames, rng)` and returns int64 indices in
[0, num_frames): shape (T,) for one clip, (V, T) for V clips of one video. Indices within a clip
never decrease. Test-mode samplers ignore `rng` and are deterministic.

Videos shorter than a clip's span are clamped: indices past the end repeat the last frame
(mmaction's "repeat_last"), which keeps clips monotone and never invents frames.
"""

import numpy as np


def _span(clip_len: int, stride: int) -> int:
    """Frames covered by `clip_len` frames taken every `stride` frames."""
    return (clip_len - 1) * stride + 1


def _even_edges(num_frames: int, parts: int) -> np.ndarray:
    """Integer boundaries of `parts` near-equal consecutive parts of [0, num_frames)."""
    return np.arange(parts + 1, dtype=np.int64) * num_frames // parts


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


class SegmentSampler:
    """TSN: split the video into `num_segments` equal segments and take one frame from each.

    Training draws a random frame within each segment; testing takes each segment's centre.
    With fewer frames than segments, neighbouring segments share frames.
    """

    def __init__(self, num_segments: int, train: bool):
        _check_positive(num_segments=num_segments)
        self.num_segments = num_segments
        self.train = train

    def __call__(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        _check_positive(num_frames=num_frames)
        if not self.train:  # centre of segment i: (i + 1/2) * num_frames / num_segments
            return (2 * np.arange(self.num_segments) + 1) * num_frames // (2 * self.num_segments)
        edges = _even_edges(num_frames, self.num_segments)
        start = edges[:-1]
        stop = np.maximum(edges[1:], start + 1)
        return start + np.floor(rng.random(self.num_segments) * (stop - start)).astype(np.int64)


class DenseSampler:
    """`clip_len` frames every `stride` frames; random start in training, centred in testing."""

    def __init__(self, clip_len: int, stride: int, train: bool):
        _check_positive(clip_len=clip_len, stride=stride)
        self.clip_len = clip_len
        self.stride = stride
        self.train = train

    def __call__(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        return self.within(0, num_frames, rng)

    def within(self, begin: int, end: int, rng: np.random.Generator) -> np.ndarray:
        """A clip inside frames [begin, end), clamped to end - 1 where the window is too short."""
        _check_positive(window=end - begin)
        max_start = max(end - begin - _span(self.clip_len, self.stride), 0)
        offset = int(rng.integers(0, max_start + 1)) if self.train else max_start // 2
        indices = begin + offset + np.arange(self.clip_len, dtype=np.int64) * self.stride
        return np.minimum(indices, end - 1)


class PairSampler:
    """Two sequences from one video (DTG-Net's anchor and guidance), shape (2, T).

    overlap=True: both are drawn independently over the whole video by `base`, so they may share
    frames and cover the same time span (the paper's better setting). overlap=False: the first is
    drawn from the first half of the video and the second from the second half, so they never
    share a frame (DTG-Net Table 2's "without temporal overlapping"). A 1-frame video cannot be
    split; both sequences are then that frame.
    """

    def __init__(self, base: "SegmentSampler | DenseSampler", overlap: bool):
        self.base = base
        self.overlap = overlap

    def __call__(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        half = num_frames // 2
        if self.overlap or half == 0:
            return np.stack([self.base(num_frames, rng), self.base(num_frames, rng)])
        return np.stack([self.base(half, rng), half + self.base(num_frames - half, rng)])


class MultiClipSampler:
    """`n` clips from `n` consecutive, non-overlapping equal windows covering the video (n, T).

    TimeBalance/TCLR use n = 4 timestamps per video. Each clip is a dense clip inside its window:
    random position in training, centred in testing; a window shorter than the clip's span
    repeats its own last frame, so clips never reach into the next window.
    """

    def __init__(self, n: int, clip_len: int, stride: int, train: bool):
        _check_positive(n=n)
        self.n = n
        self.clip = DenseSampler(clip_len, stride, train)

    def __call__(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        _check_positive(num_frames=num_frames)
        edges = _even_edges(num_frames, self.n)
        begins = np.minimum(edges[:-1], num_frames - 1)
        ends = np.maximum(edges[1:], begins + 1)
        return np.stack([self.clip.within(b, e, rng) for b, e in zip(begins, ends, strict=True)])


class UniformClipsSampler:
    """Multi-view testing: `k` dense clips with uniformly spaced starts (deterministic), (k, T).

    The possible starts [0, num_frames - span] are cut into k equal intervals and each clip starts
    at an interval's centre (as mmaction's test mode), so k = 1 gives the centred clip.
    """

    def __init__(self, k: int, clip_len: int, stride: int):
        _check_positive(k=k, clip_len=clip_len, stride=stride)
        self.k = k
        self.clip_len = clip_len
        self.stride = stride

    def __call__(self, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_positive(num_frames=num_frames)
        starts_available = max(num_frames - _span(self.clip_len, self.stride), 0) + 1
        interval = starts_available / self.k
        starts = (np.arange(self.k) * interval + interval / 2).astype(np.int64)
        indices = starts[:, None] + np.arange(self.clip_len, dtype=np.int64) * self.stride
        return np.minimum(indices, num_frames - 1)
