import dataclasses
import re
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image

from pipeline.data import render, synth
from pipeline.errors import DataError

TINY = synth.WorldSpec(
    groups_per_class=2,
    clips_per_group=1,
    test_groups=1,
    num_frames=8,
    objects_train_per_class=2,
    objects_val_per_class=1,
    scenes_train_per_class=2,
    scenes_val_per_class=1,
    bu101_per_class=2,
    stanford40_train_per_class=2,
    stanford40_test_per_class=1,
    parsing_train=3,
    parsing_val=2,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "raw"
    summary = synth.generate_world(out, TINY, workers=1)
    assert summary["videos"] == 12 * 2 and summary["train_videos"] == 12
    return out


def _lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == data.count(b"\n")  # CRLF only
    return data.decode().split("\r\n")[:-1]


def test_ucf_lists_have_the_official_format_and_split_by_group(world):
    lists = world / "ucfTrainTestlist"
    class_ind = [line.split(" ") for line in _lines(lists / "classInd.txt")]
    assert [int(i) for i, _ in class_ind] == list(range(1, 13))
    assert [name for _, name in class_ind] == sorted(synth.ACTION_NAMES)
    label_of = {name: int(i) for i, name in class_ind}

    train = [line.split(" ") for line in _lines(lists / "trainlist01.txt")]
    test = _lines(lists / "testlist01.txt")
    pattern = re.compile(r"^(\w+)/v_(\w+)_g(\d\d)_c(\d\d)\.mp4$")
    train_groups, test_groups = set(), set()
    for path, label in train:
        folder, name, group, _ = pattern.match(path).groups()
        assert folder == name and label_of[name] == int(label)
        train_groups.add((name, int(group)))
    for path in test:
        folder, name, group, _ = pattern.match(path).groups()
        assert folder == name
        test_groups.add((name, int(group)))
    assert {g for _, g in test_groups} == {1} and {g for _, g in train_groups} == {2}
    listed = {p for p, _ in train} | set(test)
    on_disk = {str(p.relative_to(world / "videos")) for p in (world / "videos").rglob("*.mp4")}
    assert listed == on_disk and len(listed) == len(train) + len(test)


def test_videos_decode_with_decord_to_the_spec_size(world):
    for path in sorted((world / "videos").rglob("*.mp4"))[:6]:
        reader = decord.VideoReader(str(path))
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        assert frames.shape == (TINY.num_frames, TINY.frame_height, TINY.frame_width, 3)
        assert reader.get_avg_fps() == pytest.approx(TINY.fps)


def _all_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def test_same_spec_gives_the_same_world_whatever_the_workers(world, tmp_path):
    again = tmp_path / "raw"
    synth.generate_world(again, TINY, workers=2)
    first, second = _all_files(world), _all_files(again)
    assert first.keys() == second.keys()
    for name, path in first.items():  # videos included: byte for byte, not only decoded
        assert path.read_bytes() == second[name].read_bytes(), name
    assert synth.world_fingerprint(world) == synth.world_fingerprint(again)


def test_encoding_the_same_frames_again_gives_the_same_bytes(tmp_path):
    # x264's assembly made repeated encodes in one process differ (7 of 24 tiny videos).
    videos = [synth.render_video(TINY, name, 2, 1)[0] for name in TINY.class_names]
    for round_ in range(3):
        for k, frames in enumerate(videos):
            synth.write_mp4(tmp_path / f"{k}_{round_}.mp4", frames, TINY.fps, TINY.crf)
    for k in range(len(videos)):
        data = {(tmp_path / f"{k}_{r}.mp4").read_bytes() for r in range(3)}
        assert len(data) == 1, TINY.class_names[k]


# The tiny world's fingerprint as generated on the development machine: a world made anywhere else
# from the same spec and pinned packages must be byte-identical (README, "Exact figures").
TINY_FINGERPRINT = "f12aa6450512863ef8ab0ea935bdf69f9edd0078b890ca4ccc60b65f4769a3a1"


def test_the_tiny_world_is_the_same_on_every_machine(world):
    recorded = synth.json.loads((world / "world.json").read_text())["sha256"]
    assert recorded == synth.world_fingerprint(world) == TINY_FINGERPRINT


def test_yuv_conversion_matches_bt601():
    frame = np.array([[[0, 0, 0], [255, 255, 255]], [[255, 0, 0], [0, 0, 255]]], np.uint8)
    planes = synth.rgb_to_yuv420p(frame).astype(int)
    assert planes[:2].tolist() == [[16, 235], [82, 41]]  # Y of black, white, red, blue
    # U, V of the block's mean colour (170, 85, 128)/2 ... by the BT.601 integer formulas
    r, g, b = 510 / 4, 255 / 4, 510 / 4
    assert abs(planes[2, 0] - (128 - 0.148 * r - 0.291 * g + 0.439 * b)) <= 1
    assert abs(planes[2, 1] - (128 + 0.439 * r - 0.368 * g - 0.071 * b)) <= 1


def test_a_different_seed_gives_different_videos():
    a, _ = synth.render_video(TINY, "Wave", 1, 1)
    b, _ = synth.render_video(dataclasses.replace(TINY, seed=1), "Wave", 1, 1)
    assert a.shape == b.shape and np.mean(a != b) > 0.5


def test_generate_replaces_an_existing_world_and_a_failed_run_leaves_the_old_one(
    tmp_path, monkeypatch
):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    small = dataclasses.replace(TINY, classes=("Clap", "Wave"), write_video_masks=True)
    synth.generate_world(out, small)
    assert not (out / "stale.txt").exists() and (out / "world.json").exists()
    masks = np.load(out / "masks" / "Wave" / "v_Wave_g02_c01.npz")["parts"]
    assert np.array_equal(masks, synth.render_video(small, "Wave", 2, 1)[1])
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temp folders left behind

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setitem(synth._WRITERS, "bu101", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate_world(out, dataclasses.replace(small, seed=5))
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
    assert synth._spec_json(small) == synth.json.loads((out / "world.json").read_text())["spec"]


def test_a_width_decord_misreads_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="decord"):
        synth.generate_world(tmp_path / "raw", dataclasses.replace(TINY, frame_width=48))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "changes", [{"frame_height": 47}, {"test_groups": 2}, {"classes": ("Dance",)}]
)
def test_invalid_specs_are_rejected(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **changes)


def test_part_masks_are_exactly_the_person_pixels():
    clip = synth.video_clip(TINY, "JumpingJack", 1, 1)
    clip = dataclasses.replace(clip, noise_std=0.0, look=dataclasses.replace(clip.look, obj=""))
    times = np.arange(TINY.num_frames) / TINY.num_frames
    frames, parts = render.render_clip(clip, TINY.frame_height, TINY.frame_width, times)
    background, no_parts = render.render_clip(
        dataclasses.replace(clip, person=False), TINY.frame_height, TINY.frame_width, times
    )
    assert parts.dtype == np.uint8 and set(np.unique(parts)) == set(range(7))
    assert not no_parts.any()
    assert np.array_equal((frames != background).any(axis=-1), parts > 0)


def test_held_object_pixels_are_background_in_the_masks():
    look = synth.video_clip(TINY, "Clap", 1, 1).look
    with_obj = render.Clip(action="Clap", look=dataclasses.replace(look, obj="ball"))
    without = dataclasses.replace(with_obj, look=dataclasses.replace(with_obj.look, obj=""))
    frames_a, parts_a = render.render_clip(with_obj, 48, 64, [0.3])
    frames_b, parts_b = render.render_clip(without, 48, 64, [0.3])
    changed = (frames_a != frames_b).any(axis=-1)
    assert changed.sum() >= 4 and not parts_a[changed].any()
    assert parts_b[changed].any()  # the ball covers some of the hand


def test_walk_left_and_walk_right_are_mirror_images_in_motion():
    look = dataclasses.replace(synth.video_clip(TINY, "WalkLeft", 1, 1).look, obj="")  # held: R
    left = render.Clip(action="WalkLeft", look=look, x_mid=0.2, phase0=0.1)
    # Mirroring swaps the legs, i.e. shifts the walk cycle by half a period.
    right = dataclasses.replace(left, action="WalkRight", x_mid=-0.2, phase0=0.6)
    times = np.arange(16) / 16
    _, mask_left = render.render_clip(left, 48, 64, times)
    _, mask_right = render.render_clip(right, 48, 64, times)
    person = (mask_right > 0) | (mask_left[:, :, ::-1] > 0)
    assert person.sum() > 16 * 100
    # Exact here; a pixel in 200 may flip where another libm rounds sin() differently.
    assert np.mean(mask_right[person] == mask_left[:, :, ::-1][person]) > 0.995

    columns = np.arange(64)
    centre_left = [(columns * (m > 0).sum(0)).sum() / (m > 0).sum() for m in mask_left]
    assert np.polyfit(times, centre_left, 1)[0] < -5  # pixels per clip, moving left

    # Without the translation a still frame cannot tell the two apart: the poses are identical.
    pose_left = render.action_pose(left, times)
    pose_right = render.action_pose(dataclasses.replace(left, action="WalkRight"), times)
    for key in pose_left:
        np.testing.assert_array_equal(pose_left[key], pose_right[key])


def test_stand_up_is_sit_down_reversed_in_time():
    look = synth.video_clip(TINY, "SitDown", 1, 1).look
    sit = render.Clip(action="SitDown", look=look, mid=0.4, speed=1.2)
    stand = dataclasses.replace(sit, action="StandUp", mid=0.6)
    times = np.linspace(0, 1, 21)
    pose_sit = render.action_pose(sit, times)
    pose_stand = render.action_pose(stand, 1 - times)
    for key in pose_sit:
        np.testing.assert_allclose(pose_sit[key], pose_stand[key], atol=1e-9)
    assert pose_sit["fs_ul_L"][0] == 1 and pose_sit["fs_ul_L"][-1] < 0.3  # it does sit down


def test_image_datasets_have_their_real_counterparts_layout(world):
    images = world / "images"
    for split, count in (("train", 2), ("val", 1)):
        for obj in render.OBJECT_NAMES:
            files = sorted(p.name for p in (images / "objects" / split / obj).iterdir())
            assert files == sorted(f"{obj}_{i}.JPEG" for i in range(count))
        for scene in render.SCENE_NAMES:
            files = sorted(p.name for p in (images / "scenes" / split / scene).iterdir())
            assert files == [f"{i:08d}.jpg" for i in range(1, count + 1)]
    categories = (images / "scenes" / "categories_places365.txt").read_text().splitlines()
    assert categories[0] == "/b/beach 0" and len(categories) == len(render.SCENE_NAMES)

    bu101 = sorted(p.name for p in (images / "bu101").iterdir())
    assert len(bu101) == 24 and "WalkLeft_0002.jpg" in bu101

    stanford = images / "stanford40"
    jpegs = {p.name for p in (stanford / "JPEGImages").iterdir()}
    train = (stanford / "ImageSplits" / "train.txt").read_text().split()
    test = (stanford / "ImageSplits" / "test.txt").read_text().split()
    assert set(train) | set(test) == jpegs and not set(train) & set(test) and len(train) == 20
    actions = (stanford / "ImageSplits" / "actions.txt").read_text().splitlines()
    assert actions[0] == "action_name\tnumber_of_images" and "walking\t3" in actions
    assert (
        (stanford / "ImageSplits" / "pointing_test.txt")
        .read_text()
        .split()[0]
        .startswith("pointing_")
    )

    parsing = images / "parsing"
    for split, count in (("train", 3), ("val", 2)):
        ids = (parsing / f"{split}_id.txt").read_text().split()
        assert len(ids) == count
        for image_id in ids:
            image = Image.open(parsing / f"{split}_images" / f"{image_id}.jpg")
            labels = np.array(Image.open(parsing / f"{split}_segmentations" / f"{image_id}.png"))
            assert image.size == (TINY.image_size, TINY.image_size) and labels.shape == (48, 48)
            assert labels.dtype == np.uint8 and labels.max() <= 6 and (labels > 0).any()


def test_sample_figure_is_written_and_checks_the_spec(world, tmp_path):
    out = tmp_path / "figures" / "synth.png"
    synth.write_sample_figure(world, out, TINY)
    with Image.open(out) as image:
        assert image.size[0] > 400 and image.size[1] > 12 * 60
    with pytest.raises(DataError, match="different spec"):
        synth.write_sample_figure(world, out, dataclasses.replace(TINY, seed=3))
