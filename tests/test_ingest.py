"""Ingest of raw video datasets into HDF5 frame shards (README.md, "Shards")."""

import io
import json
import shutil
from pathlib import Path

import av
import decord
import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.bench.data import bench_data
from pipeline.data import ingest as ingest_module
from pipeline.data.ingest import ingest, resized_shape
from pipeline.errors import DataError
from pipeline.io import partial_folder

HEIGHT, WIDTH = 48, 64  # source size; short side 32 -> stored 32 x 42
CLASSES = ["HandstandPushups", "Walk"]
# (class, group, clip, frames); groups 1-2 train, 3 test, as split 1 of UCF101 but smaller.
GOOD = [(c, g, 1, 8 + 4 * g + i) for i, c in enumerate(CLASSES) for g in (1, 2, 3)]


def write_video(path: Path, num_frames: int, height: int = HEIGHT, width: int = WIDTH) -> None:
    """A tiny H.264 mp4 of smooth moving colour (JPEG-friendly, distinct per frame)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(num_frames):
            rgb = np.stack(
                [
                    128 + 100 * np.sin(x / 9 + t / 3),
                    128 + 100 * np.cos(y / 7 - t / 5),
                    np.full_like(x, 40 + 8 * t),
                ],
                axis=-1,
            ).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _video_name(cls: str, group: int, clip: int) -> str:
    # Disk spells HandStandPushups as real UCF101 does; the lists use classInd's spelling.
    disk_cls = "HandStandPushups" if cls == "HandstandPushups" else cls
    return f"{disk_cls}/v_{disk_cls}_g{group:02d}_c{clip:02d}.mp4"


def _listed_name(cls: str, group: int, clip: int) -> str:
    return f"{cls}/v_{cls}_g{group:02d}_c{clip:02d}.mp4"


def _write_lists(raw: Path, train: list[str], test: list[str]) -> None:
    lists = raw / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    crlf = "\r\n"
    (lists / "classInd.txt").write_bytes(
        crlf.join(f"{i + 1} {c}" for i, c in enumerate(CLASSES)).encode() + b"\r\n"
    )
    label = {c: i + 1 for i, c in enumerate(CLASSES)}
    (lists / "trainlist01.txt").write_bytes(
        crlf.join(f"{p} {label[p.split('/')[0]]}" for p in train).encode() + b"\r\n"
    )
    (lists / "testlist01.txt").write_bytes(crlf.join(test).encode() + b"\r\n")


@pytest.fixture(scope="module")
def good_raw(tmp_path_factory) -> Path:
    """Six good videos in UCF101 layout (CRLF lists, a folder/file case mismatch)."""
    raw = tmp_path_factory.mktemp("ucf")
    for cls, group, clip, frames in GOOD:
        write_video(raw / "videos" / _video_name(cls, group, clip), frames)
    train = [_listed_name(c, g, k) for c, g, k, _ in GOOD if g < 3]
    test = [_listed_name(c, g, k) for c, g, k, _ in GOOD if g == 3]
    _write_lists(raw, train, test)
    return raw


@pytest.fixture
def bad_raw(good_raw, tmp_path) -> Path:
    """The good videos plus one input of every bad kind; returns the raw root."""
    raw = tmp_path / "raw"
    shutil.copytree(good_raw, raw)
    videos = raw / "videos" / "Walk"
    (videos / "v_Walk_g01_c02.mp4").write_bytes(b"")  # zero bytes
    whole = (videos / "v_Walk_g01_c01.mp4").read_bytes()
    (videos / "v_Walk_g01_c03.mp4").write_bytes(whole[: len(whole) // 2])  # truncated
    (videos / "v_Walk_g01_c04.mp4").write_bytes(b"not a video at all " * 50)  # junk
    write_video(videos / "v_Walk_g01_c05.mp4", num_frames=4)  # shorter than min_frames
    write_video(videos / "v_Walk_g01_c07.mp4", num_frames=10)  # on disk, in no list
    lists = raw / "ucfTrainTestlist"
    extra = [f"Walk/v_Walk_g01_c0{k}.mp4 2" for k in (2, 3, 4, 5, 6)]  # c06: listed, missing
    with (lists / "trainlist01.txt").open("ab") as f:
        f.write(("\r\n".join(extra) + "\r\n").encode())
    return raw


BAD_REASONS = {
    "videos/Walk/v_Walk_g01_c02.mp4": "empty file",
    "videos/Walk/v_Walk_g01_c03.mp4": "cannot decode",
    "videos/Walk/v_Walk_g01_c04.mp4": "cannot decode",
    "videos/Walk/v_Walk_g01_c05.mp4": "too short: 4 frames < min_frames 8",
    "videos/Walk/v_Walk_g01_c06.mp4": "listed in trainlist01.txt but missing",
    "videos/Walk/v_Walk_g01_c07.mp4": "in no split",
}


def run_ingest(raw: Path, out: Path, **overrides) -> dict:
    kwargs = {
        "fmt": "ucf101",
        "split": 1,
        "short_side": 32,
        "num_shards": 2,
        "codec": "raw",
        "jpeg_quality": 90,
        "min_frames": 8,
        "workers": 1,
        "strict": False,
        "seed": 0,
        **overrides,
    }
    return ingest(raw, out, **kwargs)


def read_video_frames(out: Path, row: pd.Series) -> np.ndarray:
    """All frames of one manifest row, decoded from its shard, as (T, H, W, 3) uint8."""
    with h5py.File(out / f"shard-{row['shard']:05d}.h5", "r") as file:
        frames = file["frames"][row["offset"] : row["offset"] + row["num_frames"]]
        if file.attrs["codec"] == "raw":
            return frames
    return np.stack([np.asarray(Image.open(io.BytesIO(e.tobytes()))) for e in frames])


def all_frames(out: Path) -> dict[str, np.ndarray]:
    manifest = pd.read_parquet(out / "manifest.parquet")
    return {row["path"]: read_video_frames(out, row) for _, row in manifest.iterrows()}


def test_resized_shape_keeps_aspect_with_even_sides():
    assert resized_shape(240, 320, 128) == (128, 170)
    assert resized_shape(320, 240, 128) == (170, 128)
    assert resized_shape(48, 64, 32) == (32, 42)
    assert resized_shape(48, 48, 48) == (48, 48)


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_manifest_and_frames_match_decord(good_raw, tmp_path, monkeypatch, codec):
    monkeypatch.setattr(ingest_module, "DECODE_CHUNK", 5)  # several get_batch calls per video
    out = tmp_path / "shards" / "tiny"
    summary = run_ingest(good_raw, out, codec=codec)

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest.columns) == [
        "video_id", "path", "label", "label_name", "group", "num_frames", "fps", "height",
        "width", "shard", "offset", "split1",
        "labeled_1", "labeled_5", "labeled_10", "labeled_20", "labeled_50",
    ]  # fmt: skip
    for col in ["label", "num_frames", "height", "width", "shard", "offset"]:
        assert manifest[col].dtype == np.int64, col
    assert manifest["fps"].dtype == np.float64
    assert manifest["labeled_10"].dtype == bool
    assert len(manifest) == len(GOOD) == summary["videos"]
    assert sorted(manifest["num_frames"]) == sorted(frames for *_, frames in GOOD)
    assert set(manifest["split1"]) == {"train", "test"}
    hsp = manifest[manifest["label_name"] == "HandstandPushups"]
    assert hsp["path"].str.startswith("videos/HandStandPushups/").all()  # as on disk
    assert (hsp["label"] == 0).all() and set(hsp["group"]) == {"g01", "g02", "g03"}
    assert (manifest["height"] == 32).all() and (manifest["width"] == 42).all()
    assert (manifest["fps"] == 25.0).all()
    # One labeled video per class at 1% (at least one per class), only from train.
    assert (manifest.loc[manifest["labeled_1"], "split1"] == "train").all()
    assert manifest.loc[manifest["labeled_1"], "label"].value_counts().to_dict() == {0: 1, 1: 1}

    total = 0
    for shard in range(2):
        with h5py.File(out / f"shard-{shard:05d}.h5", "r") as file:
            frames = file["frames"]
            if codec == "raw":  # one fixed-shape array, one frame per chunk
                assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 42, 3)
                assert frames.chunks == (1, 32, 42, 3)
            else:
                assert frames.dtype == h5py.vlen_dtype(np.uint8) and frames.chunks == (1,)
            assert file.attrs["codec"] == codec and file.attrs["dataset"] == "tiny"
            assert file.attrs["num_frames"] == len(frames) and len(file.attrs["key"]) == 64
            videos = manifest[manifest["shard"] == shard].sort_values("offset")
            # Videos tile the shard's frames without gaps or overlap.
            assert list(videos["offset"]) == [0, *np.cumsum(videos["num_frames"])[:-1]]
            assert len(frames) == videos["num_frames"].sum()
            total += len(frames)
    assert total == summary["frames"]

    for _, row in manifest.iterrows():
        stored = read_video_frames(out, row)
        reader = decord.VideoReader(str(good_raw / row["path"]), width=42, height=32)
        expected = reader.get_batch(list(range(len(reader)))).asnumpy()
        assert stored.shape == expected.shape
        if codec == "raw":
            np.testing.assert_array_equal(stored, expected)
        else:
            assert np.abs(stored.astype(int) - expected).mean() < 3.0

    assert pd.read_csv(out / "rejected.csv").empty
    assert (out / "ingest.json").is_file()
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("source", "short_side", "stored"),
    [((48, 48), 48, (48, 48)), ((48, 64), 36, (36, 48))],  # native size, and resized
)
def test_widths_decord_cannot_decode_fall_back_to_pyav(tmp_path, source, short_side, stored):
    raw = tmp_path / "raw"
    video = raw / "videos/Walk/v_Walk_g01_c01.mp4"
    write_video(video, 10, *source)
    _write_lists(raw, train=["Walk/v_Walk_g01_c01.mp4"], test=[])
    reader = decord.VideoReader(str(video), width=stored[1], height=stored[0])
    assert reader[0].shape[2] != 3, "decord decodes 48-wide frames now: drop the fallback"

    run_ingest(raw, tmp_path / "out", short_side=short_side, num_shards=1)

    row = pd.read_parquet(tmp_path / "out" / "manifest.parquet").iloc[0]
    assert (row["height"], row["width"], row["num_frames"]) == (*stored, 10)
    with av.open(str(video)) as container:
        expected = np.stack(
            [
                f.to_ndarray(
                    format="rgb24", width=stored[1], height=stored[0], interpolation="BILINEAR"
                )
                for f in container.decode(video=0)
            ]
        )
    np.testing.assert_array_equal(read_video_frames(tmp_path / "out", row), expected)


def test_bench_decodes_widths_decord_cannot_decode_with_pyav_like_ingest(tmp_path, capsys):
    raw = tmp_path / "raw"
    names = [f"Walk/v_Walk_g01_c0{k}.mp4" for k in (1, 2)]
    for number, name in enumerate(names):
        write_video(raw / "videos" / name, 12 + number, 48, 48)
    _write_lists(raw, train=names, test=[])
    run_ingest(raw, tmp_path / "out", short_side=48, num_shards=1)

    result = bench_data(raw, tmp_path / "out", clips=4, clip_len=8, ingest_workers=())

    assert result["source_decoder"] == "PyAV" and result["pyav_sizes"] == [(48, 48)]
    assert result["mean_abs_pixel_difference"] == 0.0  # the very frames ingest stored
    output = capsys.readouterr().out
    assert "decord decodes 48x48 frames corrupt" in output and "random clips: PyAV" in output


def test_raw_needs_one_frame_size_and_says_so_before_writing(good_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(good_raw, raw)
    write_video(raw / "videos" / _video_name("Walk", 3, 1), 12, 48, 80)  # 32x54, not 32x42
    out = tmp_path / "shards" / "tiny"

    with pytest.raises(DataError) as err:
        run_ingest(raw, out)

    message = str(err.value)
    assert "32x42: 5, 32x54: 1 videos" in message
    assert "HandStandPushups_g01_c01.mp4 to 32x42" in message
    assert "v_Walk_g03_c01.mp4 to 32x54" in message and "codec: jpeg" in message
    assert not list(out.glob("*shard-*"))  # checked before any shard was written
    summary = run_ingest(raw, out, codec="jpeg")
    assert summary["videos"] == len(GOOD)
    sizes = pd.read_parquet(out / "manifest.parquet").groupby(["height", "width"]).size()
    assert sizes.to_dict() == {(32, 42): 5, (32, 54): 1}


def test_raw_shard_fails_whole_when_decoder_and_header_probe_disagree(
    good_raw, tmp_path, monkeypatch
):
    monkeypatch.setattr(ingest_module, "probe_frame_size", lambda *_, **__: (32, 40))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="decoded at 32x42, but probing .* gave 32x40"):
        run_ingest(good_raw, out)
    assert not list(out.glob("*shard-*"))


def test_bad_inputs_are_quarantined_and_the_rest_ingested(bad_raw, tmp_path, capsys):
    out = tmp_path / "shards" / "tiny"
    summary = run_ingest(bad_raw, out)

    rejected = pd.read_csv(out / "rejected.csv")
    assert list(rejected.columns) == ["path", "reason"]
    reasons = dict(zip(rejected["path"], rejected["reason"], strict=True))
    assert reasons.keys() == BAD_REASONS.keys()
    for path, reason in BAD_REASONS.items():
        assert reasons[path].startswith(reason), (path, reasons[path])
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(manifest["path"]) == sorted(f"videos/{_video_name(*v[:3])}" for v in GOOD)
    assert summary["rejected"] == len(BAD_REASONS)
    assert summary["rejected_by_reason"]["cannot decode"] == 2
    assert f"rejected {len(BAD_REASONS)} inputs" in capsys.readouterr().out


def test_strict_raises_with_summary_and_leaves_the_earlier_output_as_it_was(bad_raw, tmp_path):
    out = tmp_path / "shards" / "tiny"
    run_ingest(bad_raw, out)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(DataError, match=r"6 inputs rejected") as err:
        run_ingest(bad_raw, out, strict=True)

    assert "2 x cannot decode" in str(err.value) and "v_Walk_g01_c03.mp4" in str(err.value)
    # The failed run's rejections are where its message says, beside the output.
    rejected_csv = partial_folder(out) / "rejected.csv"
    assert f"all listed in {rejected_csv}" in str(err.value)
    assert len(pd.read_csv(rejected_csv)) == len(BAD_REASONS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert json.loads((out / "ingest.json").read_text())["params"]["strict"] is False


def test_resume_after_kill_keeps_finished_shards_and_equals_a_clean_run(
    bad_raw, tmp_path, monkeypatch
):
    clean = tmp_path / "clean" / "tiny"
    run_ingest(bad_raw, clean, num_shards=3)

    out = tmp_path / "resumed" / "tiny"
    write_shard = ingest_module._write_shard

    def write_one_then_die(*args, **kwargs):
        write_shard(*args, **kwargs)
        raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(ingest_module, "_write_shard", write_one_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(bad_raw, out, num_shards=3)
    monkeypatch.undo()
    assert not out.exists()  # nothing that looks like an output, complete or not
    partial = partial_folder(out)
    assert [p.name for p in sorted(partial.iterdir())] == ["shard-00000.h5"]
    first_shard = (partial / "shard-00000.h5").stat()
    stale = partial / ".shard-00001.h5.abc.h5.tmp"  # as a SIGKILL mid-write would leave it
    stale.write_bytes(b"partial")

    summary = run_ingest(bad_raw, out, num_shards=3)

    assert (summary["shards_kept"], summary["shards_written"]) == (1, 2)
    assert (out / "shard-00000.h5").stat().st_mtime_ns == first_shard.st_mtime_ns
    assert not partial.exists() and not list(out.glob(".*"))
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(clean / "manifest.parquet")
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "rejected.csv"), pd.read_csv(clean / "rejected.csv")
    )
    resumed_frames, clean_frames = all_frames(out), all_frames(clean)
    for path, frames in clean_frames.items():
        np.testing.assert_array_equal(resumed_frames[path], frames)


def test_changed_inputs_or_params_redo_only_affected_shards(good_raw, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    shutil.copytree(good_raw, raw)
    out = tmp_path / "shards" / "tiny"
    run_ingest(raw, out, num_shards=3)
    assert run_ingest(raw, out, num_shards=3)["shards_written"] == 0

    manifest = pd.read_parquet(out / "manifest.parquet")
    changed = manifest.iloc[0]
    write_video(raw / changed["path"], num_frames=30)  # re-encoded: new size and mtime
    summary = run_ingest(raw, out, num_shards=3)
    assert (summary["shards_written"], summary["shards_kept"]) == (1, 2)
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert manifest.loc[changed["path"], "num_frames"] == 30

    monkeypatch.setattr(ingest_module, "SHARD_VERSION", ingest_module.SHARD_VERSION + 1)
    assert run_ingest(raw, out, num_shards=3)["shards_written"] == 3  # a new layout: all redone
    monkeypatch.undo()
    assert run_ingest(raw, out, num_shards=3, short_side=24)["shards_written"] == 3
    summary = run_ingest(raw, out, num_shards=2, short_side=24)  # fewer shards: extras removed
    assert sorted(p.name for p in out.glob("shard-*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    assert summary["shards_written"] == 2


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_output_does_not_depend_on_workers(bad_raw, tmp_path, codec):
    one, two = tmp_path / "w1" / "tiny", tmp_path / "w2" / "tiny"
    run_ingest(bad_raw, one, codec=codec, workers=1)
    run_ingest(bad_raw, two, codec=codec, workers=2)

    pd.testing.assert_frame_equal(
        pd.read_parquet(one / "manifest.parquet"), pd.read_parquet(two / "manifest.parquet")
    )
    assert (one / "rejected.csv").read_text() == (two / "rejected.csv").read_text()
    for shard in range(2):
        with (
            h5py.File(one / f"shard-{shard:05d}.h5", "r") as a,
            h5py.File(two / f"shard-{shard:05d}.h5", "r") as b,
        ):
            assert dict(a.attrs) == dict(b.attrs)
            assert len(a["frames"]) == len(b["frames"])
            for k in range(len(a["frames"])):
                assert a["frames"][k].tobytes() == b["frames"][k].tobytes()


def test_missing_split_is_a_data_error(good_raw, tmp_path):
    with pytest.raises(DataError, match="split 2"):
        run_ingest(good_raw, tmp_path / "out", split=2)


def test_hmdb51_layout(tmp_path):
    raw = tmp_path / "hmdb"
    names = {"wave": ["w1", "W2"], "brush_hair": ["b1", "b2"]}
    for cls, videos in names.items():
        for i, name in enumerate(videos):
            write_video(raw / "videos" / cls / f"{name}.avi", num_frames=8 + i)
        (raw / "splits").mkdir(parents=True, exist_ok=True)
        lines = [f"{videos[0]}.avi 1", f"{videos[1].lower()}.avi 2"]  # case differs for W2
        (raw / "splits" / f"{cls}_test_split1.txt").write_text("\r\n".join(lines) + "\r\n")

    run_ingest(raw, tmp_path / "out", fmt="hmdb51", num_shards=6)  # more shards than videos

    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("video_id")
    assert manifest.loc["b1", "label"] == 0 and manifest.loc["W2", "label"] == 1
    assert manifest.loc["W2", "path"] == "videos/wave/W2.avi"
    assert manifest.loc["W2", "split1"] == "test" and manifest.loc["w1", "split1"] == "train"
    assert (manifest["group"] == manifest.index).all()
    assert manifest.loc["W2", "num_frames"] == 9
    with h5py.File(tmp_path / "out" / "shard-00005.h5", "r") as empty:
        assert len(empty["frames"]) == 0 and empty.attrs["num_frames"] == 0
