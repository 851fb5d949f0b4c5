import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.samplers import (
    DenseSampler,
    MultiClipSampler,
    PairSampler,
    SegmentSampler,
    UniformClipsSampler,
)

frames = st.integers(1, 400)
lengths = st.integers(1, 16)
strides = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)
few = settings(max_examples=60, deadline=None)  # samplers are cheap; keep the suite quick


def check_clips(indices: np.ndarray, shape: tuple, num_frames: int) -> None:
    """Shape, dtype, bounds and non-decreasing order within every clip."""
    assert indices.shape == shape
    assert indices.dtype == np.int64
    assert indices.min() >= 0 and indices.max() < num_frames
    assert (np.diff(indices, axis=-1) >= 0).all()


def draws(sampler, num_frames: int, seed: int, times: int = 8) -> set[bytes]:
    rng = np.random.default_rng(seed)
    return {sampler(num_frames, rng).tobytes() for _ in range(times)}


@few
@given(num_frames=frames, segments=lengths, train=st.booleans(), seed=seeds)
def test_segment_sampler_one_frame_per_segment(num_frames, segments, train, seed):
    indices = SegmentSampler(segments, train)(num_frames, np.random.default_rng(seed))
    check_clips(indices, (segments,), num_frames)
    if num_frames >= segments:
        position = np.arange(segments)
        if train:  # a frame of its own segment [floor(i*n/T), floor((i+1)*n/T))
            edges = np.arange(segments + 1) * num_frames // segments
            assert (edges[:-1] <= indices).all() and (indices < edges[1:]).all()
        else:  # TSN's test frame: the one holding segment i's centre (i + 1/2) * n/T
            centre = (2 * position + 1) * num_frames  # in units of 1 / (2T) frames
            assert (2 * segments * indices <= centre).all()
            assert (centre < 2 * segments * (indices + 1)).all()


@few
@given(num_frames=st.integers(64, 400), segments=st.integers(2, 8), seed=seeds)
def test_segment_sampler_train_random_test_fixed(num_frames, segments, seed):
    assert len(draws(SegmentSampler(segments, train=True), num_frames, seed)) > 1
    assert len(draws(SegmentSampler(segments, train=False), num_frames, seed)) == 1


@few
@given(num_frames=frames, clip_len=lengths, stride=strides, train=st.booleans(), seed=seeds)
def test_dense_sampler_consecutive_with_stride(num_frames, clip_len, stride, train, seed):
    indices = DenseSampler(clip_len, stride, train)(num_frames, np.random.default_rng(seed))
    check_clips(indices, (clip_len,), num_frames)
    # a fixed stride, clamped at the last frame
    expected = np.minimum(indices[0] + np.arange(clip_len) * stride, num_frames - 1)
    assert np.array_equal(indices, expected)
    if num_frames >= (clip_len - 1) * stride + 1:
        assert (np.diff(indices) == stride).all()


@few
@given(num_frames=st.integers(64, 400), clip_len=st.integers(1, 8), stride=strides, seed=seeds)
def test_dense_sampler_train_random_test_centred(num_frames, clip_len, stride, seed):
    span = (clip_len - 1) * stride + 1
    assert len(draws(DenseSampler(clip_len, stride, train=True), num_frames, seed)) > 1
    test = DenseSampler(clip_len, stride, train=False)(num_frames, np.random.default_rng(seed))
    before, after = test[0], num_frames - 1 - test[-1]
    assert abs(before - after) <= 1 and test[-1] - test[0] == span - 1


@few
@given(num_frames=st.integers(1, 10), clip_len=st.integers(11, 16))
def test_dense_sampler_short_video_repeats_last_frame(num_frames, clip_len):
    indices = DenseSampler(clip_len, 1, train=True)(num_frames, np.random.default_rng(0))
    assert indices.tolist() == list(range(num_frames)) + [num_frames - 1] * (clip_len - num_frames)


bases = st.one_of(
    st.builds(SegmentSampler, st.integers(1, 8), st.booleans()),
    st.builds(DenseSampler, st.integers(1, 8), strides, st.booleans()),
)


@few
@given(num_frames=st.integers(2, 400), base=bases, seed=seeds)
def test_pair_sampler_without_overlap_uses_disjoint_halves(num_frames, base, seed):
    pair = PairSampler(base, overlap=False)(num_frames, np.random.default_rng(seed))
    length = len(base(num_frames, np.random.default_rng(0)))
    check_clips(pair, (2, length), num_frames)
    assert pair[0].max() < num_frames // 2 <= pair[1].min()


@few
@given(num_frames=st.integers(16, 400), segments=st.integers(2, 8), seed=seeds)
def test_pair_sampler_with_overlap_spans_overlap(num_frames, segments, seed):
    pair = PairSampler(SegmentSampler(segments, train=True), overlap=True)(
        num_frames, np.random.default_rng(seed)
    )
    check_clips(pair, (2, segments), num_frames)
    # both sequences cover the whole video, so their time spans intersect
    assert max(pair[0, 0], pair[1, 0]) <= min(pair[0, -1], pair[1, -1])


@pytest.mark.parametrize("base", [SegmentSampler(8, True), DenseSampler(8, 1, True)])
def test_pair_sampler_shares_frames_only_with_overlap(base):
    rng = np.random.default_rng(0)

    def shared(overlap: bool) -> list[int]:
        sampler = PairSampler(base, overlap)
        return [np.intersect1d(*sampler(24, rng)).size for _ in range(50)]

    assert max(shared(overlap=True)) > 0
    assert max(shared(overlap=False)) == 0


def test_pair_sampler_one_frame_video():
    pair = PairSampler(SegmentSampler(4, train=True), overlap=False)(1, np.random.default_rng(0))
    assert pair.tolist() == [[0] * 4, [0] * 4]


@few
@given(
    num_frames=frames, n=st.integers(1, 6), clip_len=lengths, stride=strides,
    train=st.booleans(), seed=seeds,
)  # fmt: skip
def test_multi_clip_sampler_clips_in_consecutive_windows(
    num_frames, n, clip_len, stride, train, seed
):
    clips = MultiClipSampler(n, clip_len, stride, train)(num_frames, np.random.default_rng(seed))
    check_clips(clips, (n, clip_len), num_frames)
    # clips follow each other in time and never reach into the next window
    assert (clips[1:, 0] >= clips[:-1, -1]).all()
    if num_frames >= n:
        assert (clips[1:, 0] > clips[:-1, -1]).all()
        edges = np.arange(n + 1) * num_frames // n
        assert (clips[:, 0] >= edges[:-1]).all() and (clips[:, -1] < edges[1:]).all()


@few
@given(num_frames=st.integers(200, 400), seed=seeds)
def test_multi_clip_sampler_timebalance_default(num_frames, seed):
    train = MultiClipSampler(4, 16, 1, train=True)
    assert len(draws(train, num_frames, seed)) > 1
    test = MultiClipSampler(4, 16, 1, train=False)
    assert len(draws(test, num_frames, seed)) == 1
    clips = test(num_frames, np.random.default_rng(seed))
    assert (np.diff(clips, axis=1) == 1).all()


@few
@given(num_frames=frames, k=st.integers(1, 10), clip_len=lengths, stride=strides, seed=seeds)
def test_uniform_clips_deterministic_and_spread(num_frames, k, clip_len, stride, seed):
    sampler = UniformClipsSampler(k, clip_len, stride)
    clips = sampler(num_frames, np.random.default_rng(seed))
    check_clips(clips, (k, clip_len), num_frames)
    assert np.array_equal(clips, sampler(num_frames, np.random.default_rng(seed + 1)))
    starts = clips[:, 0]
    available = max(num_frames - (clip_len - 1) * stride, 1)  # number of possible starts
    interval = available / k
    # starts step by about one interval, the first near the beginning and the last near the end
    assert (np.abs(np.diff(starts) - interval) <= 1).all()
    assert starts[0] <= interval / 2
    assert available - 1 - interval / 2 <= starts[-1] <= available - 1


def test_uniform_clips_one_clip_is_centred():
    clip = UniformClipsSampler(1, 8, 2)(101, None)[0]
    assert clip[0] == 101 - 1 - clip[-1]


@pytest.mark.parametrize(
    "make",
    [
        lambda: SegmentSampler(0, True),
        lambda: DenseSampler(4, 0, True),
        lambda: MultiClipSampler(0, 4, 1, True),
        lambda: UniformClipsSampler(3, 0, 1),
    ],
)
def test_samplers_reject_nonpositive_sizes(make):
    with pytest.raises(ValueError, match="must be >= 1"):
        make()


def test_samplers_reject_empty_video():
    with pytest.raises(ValueError, match="num_frames"):
        SegmentSampler(4, True)(0, np.random.default_rng(0))
