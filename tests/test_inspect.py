import h5py
import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.inspect import describe
from tests.test_clips import fixture_videos, write_test_shards

REJECTED = (
    ("videos/Walk/v_Walk_g09_c01.mp4", "cannot decode: moov atom not found"),
    ("videos/Run/v_Run_g10_c01.mp4", "too short: 3 frames < min_frames 16"),
    ("videos/Run/v_Run_g11_c01.mp4", "cannot decode: invalid data"),
)
FRAME_SIZES = {"jpeg": "24x32 4, 24x40 1, 32x24 1", "raw": "24x32 6"}  # raw: a single size


@pytest.fixture(params=["raw", "jpeg"])
def shard_dir(request, tmp_path):
    videos, labels = fixture_videos(mixed_sizes=request.param == "jpeg")
    return write_test_shards(
        tmp_path / "fixture", videos, labels, codec=request.param, rejected=REJECTED
    )


def codec_of(shard_dir) -> str:
    with h5py.File(shard_dir / "shard-00000.h5", "r") as file:
        return file.attrs["codec"]


def test_describe_shard_folder(shard_dir):
    text = describe(shard_dir)
    codec = codec_of(shard_dir)
    disk = sum(f.stat().st_size for f in shard_dir.iterdir())
    assert f"6 in 2 shards, 217 frames (9-60, median 36.5 per video), {disk / 1024:.1f} KiB" in text
    assert f"codec         {codec}" in text
    assert f"frame size    {FRAME_SIZES[codec]}" in text
    assert "classes       3: Walk 2, Run 2, Jump 2" in text
    assert "split1        train 4, test 2" in text
    assert "split2" not in text  # only the splits the source has
    assert "1%: 2 (2 classes)" in text and "10%: 2 (2 classes)" in text
    assert "rejected      3: cannot decode 2, too short 1" in text
    assert "videos/Walk/v_Walk_g09_c01.mp4: cannot decode: moov atom not found" in text
    assert "PROBLEM" not in text


def test_describe_flags_shard_missing_frames(shard_dir):
    with h5py.File(shard_dir / "shard-00001.h5", "a") as file:
        shape = file["frames"].shape
        del file["frames"]
        if file.attrs["codec"] == "raw":
            file.create_dataset("frames", (3, *shape[1:]), dtype="uint8")
        else:
            file.create_dataset("frames", (3,), dtype=h5py.vlen_dtype("uint8"))
    text = describe(shard_dir)
    assert "PROBLEM       shard-00001.h5 holds 3 frames, the manifest needs" in text
    assert text.count("PROBLEM") == 1


def test_describe_flags_raw_shard_of_old_layout_or_other_size(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "fixture", videos, labels, codec="raw")
    with h5py.File(shard_dir / "shard-00000.h5", "a") as file:  # frames as vlen bytes: old
        count = len(file["frames"])
        del file["frames"]
        file.create_dataset("frames", (count,), dtype=h5py.vlen_dtype("uint8"))
    with h5py.File(shard_dir / "shard-00001.h5", "a") as file:
        count = len(file["frames"])
        del file["frames"]
        file.create_dataset("frames", data=np.zeros((count, 24, 30, 3), np.uint8))
    text = describe(shard_dir)
    assert "shard-00000.h5 holds raw frames as object" in text and "older ingest" in text
    assert "shard-00001.h5 holds 24x30 frames, the manifest says other sizes for 3" in text


def test_describe_incomplete_shard_folder(shard_dir):
    (shard_dir / "manifest.parquet").unlink()
    text = describe(shard_dir)
    assert "INCOMPLETE: 2 shard files but no manifest.parquet" in text
    assert "rejected      3" in text


def test_describe_unknown_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match=r"not an artifact .* \(known: a shard folder"):
        describe(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        describe(tmp_path / "nothing")
