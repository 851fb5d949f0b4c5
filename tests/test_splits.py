"""Official split lists (UCF101, HMDB51), labeled subsets and validation carving."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.splits import (
    Rejection,
    carve_validation,
    labeled_subsets,
    read_hmdb51,
    read_ucf101,
)
from pipeline.errors import DataError


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # the readers never decode, any bytes will do


def _write_crlf(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode())


@pytest.fixture
def ucf_raw(tmp_path: Path) -> Path:
    """UCF101 layout: CRLF lists, blank lines, case mismatches, a missing and an unlisted file."""
    videos = tmp_path / "videos"
    # Disk spells the folder and file differently from classInd and the lists (as real UCF101).
    _touch(videos / "HandStandPushups/v_HandStandPushups_g01_c01.avi")
    _touch(videos / "HandStandPushups/v_HandStandPushups_g02_c01.avi")
    _touch(videos / "Walk/v_Walk_g01_c01.avi")
    _touch(videos / "Walk/v_Walk_g02_c02.mp4")  # the lists say .avi: matched ignoring extension
    _touch(videos / "Walk/odd name.avi")  # not UCF-style: group is the video id
    _touch(videos / "Walk/v_Walk_g03_c01.avi")  # in no list
    _touch(videos / "Walk/notes.txt")  # not a video: ignored
    lists = tmp_path / "ucfTrainTestlist"
    _write_crlf(lists / "classInd.txt", ["1 HandstandPushups", "", "2 Walk"])
    _write_crlf(
        lists / "trainlist01.txt",
        [
            "HandstandPushups/v_HandstandPushups_g01_c01.avi 1",
            "Walk/v_Walk_g01_c01.avi 2",
            "",
            "Walk/odd name.avi 2",
            "Walk/v_Walk_g09_c01.avi 2",  # missing on disk
        ],
    )
    _write_crlf(
        lists / "testlist01.txt",
        ["HandstandPushups/v_HandstandPushups_g02_c01.avi", "Walk/v_Walk_g02_c02.avi"],
    )
    _write_crlf(lists / "trainlist02.txt", ["Walk/v_Walk_g02_c02.avi 2"])
    return tmp_path


def test_read_ucf101_resolves_case_crlf_and_reports_rejections(ucf_raw):
    df, rejections = read_ucf101(ucf_raw)

    assert list(df.columns) == [
        "path", "label", "label_name", "group", "video_id", "split1", "split2",
    ]  # fmt: skip
    assert df["label"].dtype == np.int64
    rows = df.set_index("path")
    hsp = rows.loc["videos/HandStandPushups/v_HandStandPushups_g01_c01.avi"]
    assert (hsp["label"], hsp["label_name"], hsp["group"]) == (0, "HandstandPushups", "g01")
    assert hsp["video_id"] == "v_HandStandPushups_g01_c01"
    assert (hsp["split1"], hsp["split2"]) == ("train", "")
    assert rows.loc["videos/HandStandPushups/v_HandStandPushups_g02_c01.avi", "split1"] == "test"
    walk = rows.loc["videos/Walk/v_Walk_g02_c02.mp4"]
    assert (walk["label"], walk["split1"], walk["split2"]) == (1, "test", "train")
    assert rows.loc["videos/Walk/odd name.avi", "group"] == "odd name"
    assert len(df) == 5
    assert rejections == [
        Rejection("videos/Walk/v_Walk_g03_c01.avi", "in no split"),
        Rejection("videos/Walk/v_Walk_g09_c01.avi", "listed in trainlist01.txt but missing"),
    ]


def test_read_ucf101_rejects_unknown_class_folder(ucf_raw):
    lists = ucf_raw / "ucfTrainTestlist"
    _write_crlf(lists / "testlist02.txt", ["Swim/v_Swim_g01_c01.avi"])
    with pytest.raises(DataError, match="testlist02.txt:1.*Swim"):
        read_ucf101(ucf_raw)


def test_read_hmdb51_tags_classes_and_rejections(tmp_path):
    videos = tmp_path / "videos"
    for name in ["wave/a_wave_u_1.avi", "wave/B_wave_u_2.avi", "wave/c_wave_u_3.avi"]:
        _touch(videos / name)
    for name in ["brush_hair/a_brush_u_1.avi", "brush_hair/b_brush_u_2.avi"]:
        _touch(videos / name)
    _touch(videos / "brush_hair/stray.avi")  # in no split file
    splits = tmp_path / "splits"
    _write_crlf(splits / "wave_test_split1.txt", ["a_wave_u_1.avi 1", "b_wave_u_2.avi 2", ""])
    _write_crlf(splits / "wave_test_split2.txt", ["a_wave_u_1.avi 2", "c_wave_u_3.avi 0"])
    _write_crlf(
        splits / "brush_hair_test_split1.txt",
        ["a_brush_u_1.avi 1", "b_brush_u_2.avi 0", "gone.avi 1"],
    )

    df, rejections = read_hmdb51(tmp_path)

    rows = df.set_index("path")
    assert list(df.columns) == [
        "path", "label", "label_name", "group", "video_id", "split1", "split2",
    ]  # fmt: skip
    assert rows.loc["videos/brush_hair/a_brush_u_1.avi", "label"] == 0  # sorted folder names
    wave = rows.loc["videos/wave/B_wave_u_2.avi"]  # case resolved against the disk
    assert (wave["label"], wave["label_name"], wave["split1"], wave["split2"]) == (
        1,
        "wave",
        "test",
        "",
    )
    assert (rows["group"] == rows["video_id"]).all()
    assert rows.loc["videos/wave/a_wave_u_1.avi", ["split1", "split2"]].tolist() == [
        "train",
        "test",
    ]
    # Tag 0 everywhere is no split at all.
    assert rejections == [
        Rejection("videos/brush_hair/b_brush_u_2.avi", "in no split"),
        Rejection("videos/brush_hair/gone.avi", "listed in brush_hair_test_split1.txt but missing"),
        Rejection("videos/brush_hair/stray.avi", "in no split"),
        Rejection("videos/wave/c_wave_u_3.avi", "in no split"),
    ]


def test_read_hmdb51_rejects_bad_tag(tmp_path):
    _touch(tmp_path / "videos/wave/a.avi")
    _write_crlf(tmp_path / "splits/wave_test_split1.txt", ["a.avi 7"])
    with pytest.raises(DataError, match="wave_test_split1.txt:1"):
        read_hmdb51(tmp_path)


def _split_frame(class_sizes: list[int], test_per_class: int = 2) -> pd.DataFrame:
    """Videos of UCF-style groups (g01.. shared by every class), `n` train + some test per class."""
    rows = []
    for label, size in enumerate(class_sizes):
        for i in range(size + test_per_class):
            rows.append(
                {
                    "path": f"videos/C{label}/v_C{label}_g{i // 3 + 1:02d}_c{i % 3 + 1:02d}.avi",
                    "label": label,
                    "group": f"g{i // 3 + 1:02d}",
                    "split1": "train" if i < size else "test",
                }
            )
    return pd.DataFrame(rows)


@settings(max_examples=25, deadline=None)
@given(
    class_sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_labeled_subsets_stratified_nested_and_train_only(class_sizes, seed):
    df = _split_frame(class_sizes)
    out = labeled_subsets(df, "split1", percents=(1, 5, 10, 20, 50), seed=seed)

    previous = pd.Series(False, index=df.index)
    for percent in (1, 5, 10, 20, 50):
        chosen = out[f"labeled_{percent}"]
        assert chosen.dtype == bool
        assert (df.loc[chosen, "split1"] == "train").all()
        assert (chosen | ~previous).all(), "a smaller subset must be inside a larger one"
        for label, size in enumerate(class_sizes):
            expected = min(size, max(1, int(np.floor(size * percent / 100 + 0.5))))
            assert chosen[df["label"] == label].sum() == expected
        previous = chosen


def test_labeled_subsets_are_seeded_and_ignore_row_order():
    df = _split_frame([40, 40, 40])
    a = labeled_subsets(df, "split1", seed=3)
    again = labeled_subsets(df.sample(frac=1, random_state=0), "split1", seed=3).loc[df.index]
    other = labeled_subsets(df, "split1", seed=4)
    pd.testing.assert_frame_equal(a, again)
    assert not a["labeled_10"].equals(other["labeled_10"])


def _assert_groups_whole(df: pd.DataFrame, is_val: pd.Series) -> None:
    train = df["split1"] == "train"
    assert not is_val[~train].any(), "validation comes from the train split only"
    for _, members in is_val[train].groupby(df.loc[train, "group"]):
        assert members.nunique() == 1, "a group straddles train and validation"


@settings(max_examples=25, deadline=None)
@given(
    class_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    fraction=st.sampled_from([0.1, 0.2, 0.3]),
    seed=st.integers(0, 2**16),
    shared_groups=st.booleans(),
)
def test_carve_validation_never_splits_a_group(class_sizes, fraction, seed, shared_groups):
    df = _split_frame(class_sizes)
    if not shared_groups:  # HMDB-style: every video its own group
        df["group"] = df["path"]
    is_val = carve_validation(df, "split1", fraction, seed)

    assert is_val.index.equals(df.index) and is_val.dtype == bool
    _assert_groups_whole(df, is_val)
    train = df["split1"] == "train"
    for label in range(len(class_sizes)):
        assert (train & ~is_val & (df["label"] == label)).any(), "a class lost all train rows"


def test_carve_validation_is_roughly_class_balanced_and_seeded():
    df = _split_frame([60, 60, 60, 60])
    df["group"] = df["label"].astype(str) + "-" + df["group"]  # per-class groups of 3 videos
    is_val = carve_validation(df, "split1", 0.2, seed=1)
    per_class = is_val.groupby(df["label"]).sum()
    assert per_class.between(12, 15).all()  # 20% of 60, in whole groups of 3
    assert is_val.equals(carve_validation(df, "split1", 0.2, seed=1))
    assert not is_val.equals(carve_validation(df, "split1", 0.2, seed=2))
    assert not carve_validation(df, "split1", 0.0, seed=1).any()
