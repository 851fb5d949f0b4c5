import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.augment import ALL_OPS, VideoAugment, augmentation_figure


def make_clip(frames: int = 4, size: int = 16, seed: int = 0, low: float = 0.0, high: float = 1.0):
    """A (3, T, H, W) clip whose frames differ (so per-frame statistics differ)."""
    generator = torch.Generator().manual_seed(seed)
    clip = low + (high - low) * torch.rand((3, frames, size, size), generator=generator)
    return clip


def forced(op: str, **kwargs) -> VideoAugment:
    return VideoAugment((op,), p=1.0, **kwargs)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def frame_affine(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope and intercept of after = slope * before + intercept over one frame."""
    x = before.flatten().double()
    y = after.flatten().double()
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    slope, intercept = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.flatten().tolist()
    return slope, intercept


def test_flip_flips_every_frame():
    clip = make_clip()
    out = forced("flip")(clip, seeded(0))
    for t in range(clip.shape[1]):
        assert torch.equal(out[:, t], clip[:, t].flip(-1))


@pytest.mark.parametrize("op", ["contrast", "brightness"])
def test_affine_ops_apply_the_same_map_to_every_frame(op):
    # Frames with different means: a per-frame contrast would give each frame its own intercept.
    clip = make_clip(low=0.3, high=0.6)
    clip[:, 1] -= 0.1
    clip[:, 2] += 0.1
    out = forced(op)(clip, seeded(3))
    maps = [frame_affine(clip[:, t], out[:, t]) for t in range(clip.shape[1])]
    slope, intercept = maps[0]
    assert abs(slope - 1.0) > 1e-3  # the op changed the clip
    for other_slope, other_intercept in maps[1:]:
        assert other_slope == pytest.approx(slope, abs=1e-5)
        assert other_intercept == pytest.approx(intercept, abs=1e-5)
    if op == "brightness":
        assert intercept == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("op", ALL_OPS)
def test_static_clip_stays_static(op):
    # Every op draws once per clip, so identical frames must stay identical.
    clip = make_clip(frames=1).repeat(1, 5, 1, 1)
    out = forced(op)(clip, seeded(1))
    assert not torch.equal(out, clip)
    for t in range(1, out.shape[1]):
        assert torch.equal(out[:, t], out[:, 0])


def test_per_frame_noise_option_differs_across_frames():
    clip = torch.full((3, 3, 16, 16), 0.5)
    out = forced("noise", noise_shared_across_frames=False)(clip, seeded(1))
    assert not torch.equal(out[:, 0], out[:, 1])


@given(seed=st.integers(0, 2**32 - 1), frames=st.integers(1, 5), size=st.integers(8, 20))
@settings(max_examples=15, deadline=None)
def test_output_shape_range_and_determinism(seed, frames, size):
    clip = make_clip(frames=frames, size=size, seed=seed % 1000)
    augment = VideoAugment()
    out = augment(clip, seeded(seed))
    assert out.shape == clip.shape
    assert out.dtype == clip.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, augment(clip, seeded(seed)))


def test_numpy_generator_is_deterministic_and_seeds_differ():
    clip = make_clip()
    augment = VideoAugment()
    outs = [augment(clip, np.random.default_rng(seed)) for seed in (5, 5, 6)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_p_zero_is_identity_and_p_half_fires_about_half():
    clip = make_clip()
    assert torch.equal(VideoAugment(p=0.0)(clip, seeded(0)), clip)
    augment = VideoAugment()
    fired = [len(augment.draw(clip.shape, seeded(seed))) for seed in range(200)]
    assert np.mean(fired) / len(ALL_OPS) == pytest.approx(0.5, abs=0.05)


def test_channel_split_copies_one_channel_onto_another():
    clip = make_clip()
    augment = forced("channel_split")
    sources = set()
    for seed in range(20):
        (draw,) = augment.draw(clip.shape, seeded(seed))
        source, target = draw.params["source"], draw.params["target"]
        assert source != target
        sources.add(source)
        out = augment.apply(clip, [draw])
        assert torch.equal(out[target], clip[source])
        kept = [c for c in range(3) if c != target]
        assert torch.equal(out[kept], clip[kept])
    assert sources == {0, 1, 2}


def test_noise_std_is_point_one():
    clip = torch.full((3, 4, 64, 64), 0.5)
    out = forced("noise")(clip, seeded(2))
    assert (out - clip).std().item() == pytest.approx(0.1, rel=0.05)
    assert (out - clip).mean().item() == pytest.approx(0.0, abs=0.01)


def test_blur_reduces_high_frequencies():
    clip = make_clip(size=32)
    out = forced("blur", blur_sigma=(1.5, 1.5))(clip, seeded(0))
    assert out.diff(dim=-1).abs().mean() < 0.5 * clip.diff(dim=-1).abs().mean()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown"):
        VideoAugment(("shear",))
    with pytest.raises(ValueError, match="float"):
        VideoAugment()(torch.zeros((3, 2, 8, 8), dtype=torch.uint8), seeded(0))
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        VideoAugment()(torch.zeros((2, 3, 8, 8)), seeded(0))


def test_figure_is_written(tmp_path):
    clip = (np.random.default_rng(0).random((6, 24, 32, 3)) * 255).astype(np.uint8)
    out_png = tmp_path / "figs" / "augment.png"
    augmentation_figure(clip, out_png, num_frames=3)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out_png.parent.iterdir()] == ["augment.png"]  # no temp file left
