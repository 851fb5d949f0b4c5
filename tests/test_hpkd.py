"""The human-parsing KD method: its losses by hand, the part maps' crop / flip / channel-swap
alignment with the query clip, the speed pairs, and the method's step."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.speed import (
    SpeedPairDataset,
    SpeedSampler,
    crop_and_flip_parts,
    left_right_swap,
)
from pipeline.errors import DataError
from pipeline.methods.hpkd import (
    HPKD,
    appearance_nce,
    parsing_kd_loss,
    speed_pairs,
    speed_ranking_loss,
)
from pipeline.models import TINY_VIDEO_SETTINGS, build_video_model
from pipeline.teachers.schp import SCHP_LABEL_SETS
from tests.test_clips import write_test_shards


def test_kd_loss_is_eq4_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, C=2, 1, 2): two positions
    teacher = torch.tensor([[[[0.75, 0.5]], [[0.25, 0.5]]]])
    p0 = np.exp(2) / (np.exp(2) + 1)  # position 0: softmax(2, 0)
    p1 = 1 / (1 + np.exp(1))  # position 1: softmax(0, 1)[0]
    by_hand = (
        -((0.75 * np.log(p0) + 0.25 * np.log(1 - p0)) + (0.5 * np.log(p1) + 0.5 * np.log(1 - p1)))
        / 2
    )
    assert parsing_kd_loss(logits, teacher).item() == pytest.approx(by_hand, rel=1e-6)


def test_kd_loss_gradient_is_kls():
    logits = torch.randn(2, 5, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 5, 3, 3).softmax(1)
    parsing_kd_loss(logits, teacher).backward()
    ours = logits.grad.clone()
    logits.grad = None
    kl = F.kl_div(F.log_softmax(logits, 1), teacher, reduction="sum") / (2 * 3 * 3)
    kl.backward()
    assert torch.allclose(ours, logits.grad, atol=1e-6)


def test_speed_ranking_loss_is_rspnets_margin_ranking_by_hand():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    same = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    other = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=1)
    tau, margin = 0.5, 2.0
    s_pos = np.array([np.sqrt(0.5), 1.0]) / tau
    s_neg = np.array([1.0, 0.0]) / tau
    by_hand = np.maximum(0, margin - (s_pos - s_neg)).mean()
    got = speed_ranking_loss(q, same, other, tau=tau, margin=margin)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


def test_appearance_nce_is_mocos_infonce_by_hand():
    q = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    k = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    queue = F.normalize(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), dim=1)
    tau = 0.1
    logits = np.array([np.sqrt(0.5), 0.0, -1.0]) / tau
    by_hand = -logits[0] + np.log(np.exp(logits).sum())
    assert appearance_nce(q, k, queue, tau=tau).item() == pytest.approx(by_hand, rel=1e-5)


def test_the_positive_key_is_the_one_at_the_querys_speed():
    keys = torch.arange(12.0).view(3, 2, 2)  # (B, speed, D)
    same, other = speed_pairs(keys, torch.tensor([0, 1, 1]))
    assert same.tolist() == [keys[0, 0].tolist(), keys[1, 1].tolist(), keys[2, 1].tolist()]
    assert other.tolist() == [keys[0, 1].tolist(), keys[1, 0].tolist(), keys[2, 0].tolist()]


# ---------------------------------------------------------------- part maps


def test_left_right_swap_mirrors_the_lip_and_atr_limbs_and_keeps_pascal():
    lip = SCHP_LABEL_SETS["lip"][1]
    swap = left_right_swap(lip)
    for left, right in (("Left-arm", "Right-arm"), ("Left-leg", "Right-leg"),
                        ("Left-shoe", "Right-shoe")):  # fmt: skip
        assert swap[lip.index(left)] == lip.index(right)
        assert swap[lip.index(right)] == lip.index(left)
    assert sorted(swap) == list(range(len(lip)))
    assert sum(i != j for i, j in enumerate(swap)) == 6
    atr = SCHP_LABEL_SETS["atr"][1]
    assert sum(i != j for i, j in enumerate(left_right_swap(atr))) == 6
    pascal = SCHP_LABEL_SETS["pascal"][1]
    assert left_right_swap(pascal) == list(range(len(pascal)))
    with pytest.raises(ValueError, match="no mirror"):
        left_right_swap(["Background", "Left-arm"])


def test_the_whole_square_unflipped_is_the_cached_map():
    parts = torch.rand(3, 8, 8).softmax(0)
    out = crop_and_flip_parts(parts, (0.0, 0.0, 1.0), flip=False, swap=[0, 1, 2], size=8)
    assert torch.allclose(out, parts, atol=1e-6)


def test_a_crop_resamples_its_box_and_keeps_distributions():
    parts = torch.zeros(2, 8, 8)
    parts[1, :, :4] = 1.0  # part 1 on the left half of the square
    parts[0] = 1 - parts[1]
    left_half = crop_and_flip_parts(parts, (0.0, 0.0, 0.5), flip=False, swap=[0, 1], size=4)
    assert torch.allclose(left_half[1], torch.ones(4, 4))
    shifted = crop_and_flip_parts(parts, (0.25, 0.25, 0.5), flip=False, swap=[0, 1], size=4)
    assert torch.allclose(shifted[1, :, :2], torch.ones(4, 2)) and shifted[1, :, 2:].max() < 1e-6
    assert torch.allclose(shifted.sum(0), torch.ones(4, 4), atol=1e-6)


def test_a_flip_mirrors_the_map_and_swaps_left_and_right_parts():
    lip = SCHP_LABEL_SETS["lip"][1]
    left_arm, right_arm = lip.index("Left-arm"), lip.index("Right-arm")
    parts = torch.zeros(len(lip), 4, 4)
    parts[0] = 1.0
    parts[0, 1, 0], parts[left_arm, 1, 0] = 0.0, 1.0  # the person's left arm at column 0
    out = crop_and_flip_parts(parts, (0.0, 0.0, 1.0), flip=True, swap=left_right_swap(lip), size=4)
    # mirrored to column 3, and a mirrored left arm is a right arm
    assert out[right_arm, 1, 3] == pytest.approx(1.0) and out[left_arm].max() < 1e-6
    assert out[0, 1, 3] == pytest.approx(0.0) and out[0, 1, 0] == pytest.approx(1.0)


class BarParts:
    """A parsing "teacher" that sees a bright vertical bar: part 1 on the bar's cell of the
    centre square of each frame at 8 x 8, as the feature cache stores it."""

    def __init__(self, cells: dict[int, np.ndarray]):
        self.cells = cells

    def read(self, row: int, frame_indices) -> dict:
        maps = []
        for frame in np.asarray(frame_indices).ravel():
            part = np.zeros((8, 8), np.float32)
            part[:, self.cells[row][frame]] = 1.0
            maps.append(np.stack([1 - part, part]))
        return {"parts": np.stack(maps)}


@pytest.fixture(scope="module")
def bar_world(tmp_path_factory):
    """Videos of 16 frames, 32 x 48 px, pixel value = 8 x frame index, and a white bar filling
    one random cell column of the centre 32 x 32 square (4 px), moving from frame to frame."""
    rng = np.random.default_rng(0)
    videos, cells = [], {}
    for v in range(6):
        frames = np.repeat(8 * np.arange(16, dtype=np.uint8)[:, None, None, None], 3, axis=3)
        frames = np.broadcast_to(frames, (16, 32, 48, 3)).copy()
        cells[v] = rng.integers(0, 8, size=16)
        for t, cell in enumerate(cells[v]):
            frames[t, :, 8 + 4 * cell : 12 + 4 * cell, 0] = 255
        videos.append(frames)
    shards = write_test_shards(tmp_path_factory.mktemp("bar") / "shards", videos,
                               [v % 3 for v in range(6)], num_shards=1)  # fmt: skip
    return shards, BarParts(cells)


@pytest.mark.parametrize("flip", [False, True])
def test_the_target_map_follows_the_querys_crop_and_flip(bar_world, flip):
    """At one output cell per pixel, the target's bar is exactly where the query's bar is."""
    shards, parts = bar_world
    dataset = SpeedPairDataset(shards, rows=np.arange(6), frames=4, crop_size=16, seed=0,
                               flip=flip, parts=parts, swap=[0, 1], parts_out=16)  # fmt: skip
    seen = 0
    for epoch in range(4):
        for position in range(6):
            item = dataset[(epoch, position)]
            middle = item["video"][0, 2].numpy()  # red channel of the middle frame (16, 16)
            bar = np.flatnonzero((middle == 255).all(axis=0))
            target = np.flatnonzero((item["parts"][1] > 0.5).all(dim=0).numpy())
            assert bar.tolist() == target.tolist(), (epoch, position)
            seen += len(bar) > 0
    assert seen >= 6


def test_speed_items_pair_a_1x_and_a_2x_key_and_the_query_speed_is_its_stride(bar_world):
    shards, parts = bar_world
    dataset = SpeedPairDataset(shards, rows=np.arange(6), frames=4, crop_size=16, seed=0)
    speeds = set()
    for position in range(6):
        item = dataset[position]
        green = lambda clip: (clip[1, :, 0, 0].numpy() // 8).tolist()  # noqa: E731 frame index
        query, slow, fast = green(item["video"]), green(item["keys"][0]), green(item["keys"][1])
        assert np.diff(query).tolist() == [item["speed"] + 1] * 3
        assert np.diff(slow).tolist() == [1, 1, 1] and np.diff(fast).tolist() == [2, 2, 2]
        assert fast[0] == slow[0]  # one key window, seen at 1x and at 2x
        speeds.add(item["speed"])
        assert "parts" not in item and item["label"] == -1  # pre-training never sees labels
    assert speeds == {0, 1}


def test_speed_sampler_needs_the_2x_window():
    with pytest.raises(DataError, match="shorter than the 2x key window"):
        SpeedSampler(8)(12, np.random.default_rng(0))


# ---------------------------------------------------------------- the method


def tiny(name="r3d_18", branches=1):
    settings = TINY_VIDEO_SETTINGS[name] | {"stem_stride": 2}
    return build_video_model(name, num_classes=0, branches=branches, **settings)


def batch(size=4, parts=3):
    generator = torch.Generator().manual_seed(0)
    return {
        "video": torch.randn(size, 3, 4, 16, 16, generator=generator),
        "keys": torch.randn(size, 2, 3, 4, 16, 16, generator=generator),
        "speed": torch.tensor([0, 1] * (size // 2)),
        "parts": torch.rand(size, parts, 4, 4, generator=generator).softmax(1),
    }


@pytest.mark.parametrize("variant", ["full", "ti", "rsp"])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(variant):
    torch.manual_seed(0)
    network = tiny(branches=2 if variant == "full" else 1)
    method = HPKD(network, variant=variant, num_parts=3, parts_size=4, queue_size=8, momentum=0.9)
    optimiser = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    fixed = batch()
    negatives = method.queue.clone()
    losses = []
    for _ in range(15):
        method.queue.copy_(negatives)  # else the batch's own keys become its negatives
        out = method(fixed)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert set(out.logs) == ({"motion", "appearance"} | ({"kd"} if variant != "rsp" else set()))
    assert (method.decoder is None) == (variant == "rsp")


def test_the_key_encoder_follows_by_momentum_and_is_outside_the_optimiser():
    torch.manual_seed(0)
    method = HPKD(tiny(branches=2), variant="full", num_parts=3, parts_size=4, queue_size=8,
                  momentum=0.5)  # fmt: skip
    assert not any(p.requires_grad for p in method.key_model.parameters())
    online = next(method.model.parameters())
    key = next(method.key_model.parameters())
    with torch.no_grad():
        online.add_(1.0)
    before = key.clone()
    method(batch())
    assert torch.allclose(key, 0.5 * before + 0.5 * online)
    # the queue took the batch's 4 other-speed keys
    assert method.queue_pointer.item() == 4


def test_variants_need_their_network_and_part_maps():
    with pytest.raises(ValueError, match="branched"):
        HPKD(tiny(), variant="full", num_parts=3)
    with pytest.raises(ValueError, match="plain"):
        HPKD(tiny(branches=2), variant="ti", num_parts=3)
    with pytest.raises(ValueError, match="num_parts"):
        HPKD(tiny(), variant="ti", num_parts=0)
    with pytest.raises(ValueError, match="variant"):
        HPKD(tiny(), variant="kd", num_parts=3)


def test_full_reads_parts_from_h_h_and_contrast_from_h_c():
    """The decoder's gradient reaches h_h and f_l, never h_c; the contrastive heads' reach h_c
    and f_l, never h_h."""
    torch.manual_seed(0)
    network = tiny(branches=2)
    only_kd = HPKD(network, variant="full", num_parts=3, parts_size=4, queue_size=8,
                   motion_weight=0.0, appearance_weight=0.0)  # fmt: skip
    only_kd(batch()).loss.backward()
    grad = lambda m: sum(p.grad.abs().sum().item() for p in m.parameters() if p.grad is not None)  # noqa: E731
    assert grad(network.high[0]) > 0 and grad(network.low) > 0 and grad(network.high[1]) == 0
    network.zero_grad(set_to_none=True)
    contrast = HPKD(network, variant="full", num_parts=3, parts_size=4, queue_size=8)
    contrast.kd_weight = 0.0
    contrast(batch()).loss.backward()
    assert grad(network.high[1]) > 0 and grad(network.high[0]) == 0
