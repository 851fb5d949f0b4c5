"""The second synthetic world: HMDB51's layout, read by the HMDB51 ingest path unchanged."""

import dataclasses
import json
import re
from pathlib import Path

import av
import decord
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.data import render, synth
from pipeline.data.ingest import ingest
from pipeline.data.splits import carve_validation, read_hmdb51
from pipeline.errors import DataError
from tests.conftest import run_cli

# 8 classes x 4 groups (one of each title form) x 2 clips; per class and split 1 group test, 1
# unused, 2 train.
TINY = synth.HmdbWorldSpec(
    groups_per_class=4, clips_per_group=2, test_groups=1, unused_groups=1, num_frames=8
)
# <title>_<class>_<body>_<camera>_<people>_<view>_<quality>_<clip>.avi; group: <title>_<class>
NAME = re.compile(r"^(?P<group>.+)_f_(?:cm|nm)_np1_fr_(?:goo|med|bad)_(?P<clip>\d+)\.avi$")
SPLIT_LINE = re.compile(r"^(?P<name>\S+\.avi) (?P<tag>[012]) $")
TAGS = {"1": "train", "2": "test", "0": ""}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_hmdb") / "raw"
    summary = synth.generate_hmdb_world(out, TINY, workers=1)
    assert summary["videos"] == 8 * 4 * 2
    for number in (1, 2, 3):
        assert summary[f"split{number}"] == {"train": 32, "test": 16, "unused": 16}
    return out


def _videos(world: Path) -> dict[str, list[str]]:
    return {
        folder.name: sorted(p.name for p in folder.iterdir())
        for folder in sorted((world / "videos").iterdir())
    }


def _split_lines(path: Path) -> list[tuple[str, str]]:
    data = path.read_bytes()
    assert data.endswith(b" \n") and b"\r" not in data  # LF lines, each with a trailing space
    lines = data.decode().split("\n")[:-1]
    assert lines == sorted(lines)
    matches = [SPLIT_LINE.match(line) for line in lines]
    assert all(matches), lines
    return [(m["name"], m["tag"]) for m in matches]


def _group(name: str) -> str:
    return NAME.match(name)["group"]


def test_videos_are_in_class_folders_with_hmdb51_names(world):
    videos = _videos(world)
    assert list(videos) == TINY.class_names == sorted(synth.HMDB_CLASSES)
    for class_name, names in videos.items():
        assert len(names) == 8
        for name in names:
            match = NAME.match(name)
            assert match and match["group"].endswith(f"_{class_name}"), name
            assert int(match["clip"]) in (0, 1) and not match["group"].startswith("_"), name
        assert len({_group(name) for name in names}) == 4  # one title per source video
    every_name = "".join(name for names in videos.values() for name in names)
    for char in "#()!&'":
        assert char in every_name
    clap = videos["clap"]
    assert any(name.startswith("Clap_Hands!_(") and "_&_" in name for name in clap), clap
    assert sorted(p.name for p in world.iterdir()) == ["splits", "videos", "world.json"]


def test_split_files_tag_whole_groups_70_30_in_three_different_splits(world):
    videos = _videos(world)
    expected = sorted(f"{c}_test_split{k}.txt" for c in TINY.class_names for k in (1, 2, 3))
    assert sorted(p.name for p in (world / "splits").iterdir()) == expected
    splits = {}
    for class_name, names in videos.items():
        for number in (1, 2, 3):
            lines = _split_lines(world / "splits" / f"{class_name}_test_split{number}.txt")
            assert [name for name, _ in lines] == names  # every video once, none missing
            tags_of_group: dict[str, set] = {}
            for name, tag in lines:
                tags_of_group.setdefault(_group(name), set()).add(tag)
            assert all(len(tags) == 1 for tags in tags_of_group.values())  # a group: one side
            counts = sorted(tag for tags in tags_of_group.values() for tag in tags)
            assert counts == ["0", "1", "1", "2"]  # groups: 1 unused, 2 train, 1 test
            splits[class_name, number] = dict(lines)
    for class_name in videos:
        a, b, c = (splits[class_name, k] for k in (1, 2, 3))
        assert a != b and b != c and a != c
        for name in a:  # every video is train or test in some split
            assert {a[name], b[name], c[name]} != {"0"}


def test_default_splits_are_hmdb51s_70_30():
    tags = synth.hmdb_split_tags(synth.HmdbWorldSpec(), "clap")
    for split in tags.values():
        counts = [list(split.values()).count(tag) for tag in (1, 2, 0)]
        assert counts == [9, 4, 1]  # x 5 clips: 45 train, 20 test, 5 unused
    tests = [{g for g, tag in tags[k].items() if tag == 2} for k in (1, 2, 3)]
    assert not (tests[0] & tests[1] or tests[1] & tests[2] or tests[0] & tests[2])


def test_videos_are_mpeg4_avi_that_decord_reads_at_the_spec_size(world):
    paths = sorted((world / "videos").rglob("*.avi"))
    for path in paths[::9]:
        reader = decord.VideoReader(str(path))
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        assert frames.shape == (TINY.num_frames, TINY.frame_height, TINY.frame_width, 3)
        assert reader.get_avg_fps() == pytest.approx(TINY.fps)
    with av.open(str(paths[0])) as container:
        assert container.format.name == "avi"
        assert container.streams.video[0].codec_context.name == "mpeg4"


def test_decoded_videos_show_the_rendered_frames(world):
    name = synth.hmdb_video_name(TINY, "point", 2, 1)
    assert name.startswith(synth.hmdb_title(TINY, "point", 2)) and "'s_Look_Over_There#2" in name
    reader = decord.VideoReader(str(world / "videos" / "point" / f"{name}.avi"))
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy().astype(int)
    rendered, parts = synth.render_hmdb_video(TINY, "point", 2, 1)
    assert np.abs(decoded - rendered).mean() < 12  # lossy, but the same video
    assert parts.max() == 6 and (parts > 0).mean() > 0.05


def _ingest(raw: Path, out: Path, split: int = 1) -> dict:
    """As the ingest stage calls it (pipeline.cli.cmd_ingest) for `format: hmdb51`."""
    return ingest(
        raw,
        out,
        fmt="hmdb51",
        split=split,
        short_side=48,
        num_shards=2,
        codec="raw",
        jpeg_quality=90,
        min_frames=8,
        workers=1,
        strict=True,
        seed=0,
    )


def test_the_hmdb51_ingest_path_reads_the_world(world, tmp_path):
    summary = _ingest(world, tmp_path / "shards")
    assert summary["videos"] == 64 and summary["rejected"] == 0
    manifest = pd.read_parquet(tmp_path / "shards" / "manifest.parquet")
    names = sorted(manifest["label_name"].unique())
    assert names == TINY.class_names
    assert (manifest["label"] == manifest["label_name"].map(names.index)).all()
    assert (manifest["num_frames"] == TINY.num_frames).all()
    assert (manifest["height"] == TINY.frame_height).all()
    assert (manifest["width"] == TINY.frame_width).all()
    for number in (1, 2, 3):
        listed = {}
        for class_name in TINY.class_names:
            split_file = world / "splits" / f"{class_name}_test_split{number}.txt"
            for name, tag in _split_lines(split_file):
                listed[f"videos/{class_name}/{name}"] = TAGS[tag]
        assert manifest.set_index("path")[f"split{number}"].to_dict() == listed
    # Groups are HMDB51's source videos (title and class), whole on either side of a split and
    # of the validation carve.
    groups = [_group(Path(path).name) for path in manifest["path"]]
    assert (manifest["group"] == groups).all() and manifest["group"].nunique() == 32
    for number in (1, 2, 3):
        assert (manifest.groupby("group")[f"split{number}"].nunique() == 1).all()
    is_val = carve_validation(manifest, "split1", fraction=0.5, seed=0)
    assert is_val.any()
    assert (is_val.groupby(manifest["group"]).nunique() == 1).all()


def test_read_hmdb51_takes_the_source_video_as_group(tmp_path):
    names = {
        "Clap!_(Kitchen_&_Cup)_1_clap_f_cm_np1_fr_med_0": "Clap!_(Kitchen_&_Cup)_1_clap",
        "#20_Rhythm_clap_u_nm_np1_fr_goo_1": "#20_Rhythm_clap",  # as HMDB51 names its clips
        "Ben's_Kick#2_kick_f_cm_np2_ba_bad_12": "Ben's_Kick#2_kick",
        "odd name": "odd name",  # not HMDB51-style: its own group
    }
    for name in names:
        path = tmp_path / "videos" / "clap" / f"{name}.avi"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    split = tmp_path / "splits" / "clap_test_split1.txt"
    split.parent.mkdir()
    split.write_text("".join(f"{name}.avi 1 \n" for name in names))
    df, rejections = read_hmdb51(tmp_path)
    assert rejections == []
    assert dict(zip(df["video_id"], df["group"], strict=True)) == names


def test_same_spec_gives_the_same_files_whatever_the_workers(world, tmp_path):
    again = tmp_path / "raw"
    synth.generate_hmdb_world(again, TINY, workers=2)
    first = {str(p.relative_to(world)): p for p in world.rglob("*") if p.is_file()}
    second = {str(p.relative_to(again)): p for p in again.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    for name, path in first.items():  # videos byte for byte, not only decoded
        assert path.read_bytes() == second[name].read_bytes(), name
    recorded = json.loads((world / "world.json").read_text())["sha256"]
    assert recorded == synth.world_fingerprint(world) == TINY_FINGERPRINT


# The tiny second world's fingerprint as generated on the development machine (as
# tests/test_synth.py's TINY_FINGERPRINT for the first world).
TINY_FINGERPRINT = "3a463e50e9e7450db3e01f1f5a02ae562daa3be18f37187bda070b89d13b2d3d"


def test_a_different_seed_gives_other_videos_and_the_first_world_is_untouched():
    a, _ = synth.render_hmdb_video(TINY, "wave", 1, 0)
    b, _ = synth.render_hmdb_video(dataclasses.replace(TINY, seed=1), "wave", 1, 0)
    assert np.mean(a != b) > 0.5
    # Streams of its own: the second world's wave is not the first world's Wave.
    first, _ = synth.render_video(synth.WorldSpec(num_frames=8), "Wave", 1, 1)
    assert np.mean(a != first) > 0.5
    # The first world draws from its own tables, which the second world's actions stay out of.
    assert len(render.VIDEO_ACTIONS) == 12 and tuple(render.VIDEO_ACTIONS) == synth.ACTION_NAMES
    assert render.POSES == render.VIDEO_ACTIONS | render.STILL_ACTIONS
    assert not set(render.EXTRA_VIDEO_ACTIONS) & set(render.POSES)
    assert set(synth.HMDB_CLASSES.values()) <= set(render.ALL_ACTIONS)


def test_the_new_actions_move_and_differ_from_standing():
    look = synth.hmdb_video_clip(TINY, "clap", 1, 0).look
    times = np.linspace(0, 1, 33)
    for name in render.EXTRA_VIDEO_ACTIONS:
        pose = render.action_pose(render.Clip(action=name, look=look), times)
        deviation = render.pose_deviation(pose)
        assert deviation.min() < 0.1 and deviation.max() > 0.9, name  # from standing, and back


@pytest.mark.parametrize(
    "changes",
    [
        {"unused_groups": 2},  # more than test_groups
        {"test_groups": 2, "unused_groups": 2},  # no train group left
        {"classes": ("clap", "Clap")},
        {"frame_width": 63},
        {"qscale": 0},
    ],
)
def test_invalid_specs_are_rejected(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **changes)


def test_params_section_mirrors_the_spec():
    from pipeline.config import SynthHMDBParams

    spec = {f.name: f.default for f in dataclasses.fields(synth.HmdbWorldSpec)}
    mirror = SynthHMDBParams().model_dump()
    assert set(mirror) == set(spec)
    assert {k: v for k, v in mirror.items() if v is not None and v != spec[k]} == {}
    # The rendering knobs are the first world's, default for default.
    first = dataclasses.asdict(synth.WorldSpec())
    shared = set(spec) & set(first) - {"classes", "groups_per_class", "test_groups"}
    assert {k: (spec[k], first[k]) for k in shared if spec[k] != first[k]} == {}


def test_sample_figure(world, tmp_path):
    out = tmp_path / "figure.png"
    synth.write_hmdb_sample_figure(world, out, TINY)
    with Image.open(out) as image:
        assert image.size[0] > 400 and image.size[1] > 8 * 60
    with pytest.raises(DataError, match="different spec"):
        synth.write_hmdb_sample_figure(world, out, dataclasses.replace(TINY, seed=3))


def test_synth_command_writes_the_second_world(tmp_path, project_params):
    project_params["synth_hmdb"] = {
        "groups_per_class": 3,
        "clips_per_group": 1,
        "test_groups": 1,
        "unused_groups": 2,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_params))
    result = run_cli("synth", "--world", "hmdb51", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "params: synth_hmdb: need 0 <= unused_groups <= test_groups"

    project_params["synth_hmdb"].update(unused_groups=1, classes=["clap", "point"], num_frames=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_params))
    run_cli("synth", "--world", "hmdb51", cwd=tmp_path, check=True)
    raw = tmp_path / project_params["datasets"]["synth_hmdb"]["raw"]
    assert sorted(p.name for p in (raw / "videos").iterdir()) == ["clap", "point"]
    assert len(list((raw / "splits").iterdir())) == 6
    assert (tmp_path / "results" / "figures" / "synth_hmdb_samples.png").is_file()
    assert not (tmp_path / "data" / "raw" / "synth").exists()  # the first world: untouched
