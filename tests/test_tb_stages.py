"""TimeBalance's multi-clip items, SSL teacher pre-training and per-video similarity score."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.multiclip import MultiClipDataset
from pipeline.errors import DataError
from pipeline.timebalance import (
    load_ssl_teacher,
    motion_only_report,
    pretrain_ssl_teacher,
    similarity_table,
    ssl_dataset,
)
from tests.test_clips import fixture_frames, write_test_shards

FRAMES = 32
TINY_MODEL = {"name": "r3d_18", "width": 4, "layers": [1, 1, 1, 1], "stem_stride": 4}
SSL = {
    "num_clips": 4,
    "clip_frames": 8,
    "stride": 1,
    "global_frames": 32,
    "augmentations": 2,
    "global_augmentations": 2,
    "crop": 16,
    "flip": False,
    "augment": {"ops": [], "p": 0.3, "noise_std": 0.1},
    "tau": 0.1,
    "head_hidden": 16,
    "embed_dim": 8,
    "loss_form": "paper",
    "invariant_global_weight": 0.0,
    "local_weight": 1.0,
    "global_local_weight": 1.0,
}
TRAIN = {
    "epochs": 1,
    "batch_size": 4,
    "optimizer": "adam",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "nesterov": False,
    "schedule": "constant",
    "milestones": (),
    "gamma": 0.1,
    "warmup_epochs": 0,
    "plateau_patience": 10,
    "plateau_factor": 0.5,
    "grad_clip": None,
    "device": "cpu",
    "amp": "off",
    "channels_last": True,
    "val_every": 1,
    "workers": 0,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    videos = [fixture_frames(v, FRAMES, 24, 32) for v in range(12)]
    return write_test_shards(
        tmp_path_factory.mktemp("tb") / "shards", videos, [v % 3 for v in range(12)]
    )


def dataset(shards, train=True, **changes):
    options = {
        "num_clips": 4,
        "clip_frames": 8,
        "stride": 1,
        "global_frames": 32,
        "augmentations": 2,
        "global_augmentations": 2,
        "crop_size": 16,
        "train": train,
        "seed": 3,
    } | changes
    return MultiClipDataset(shards, rows=np.arange(12), **options)


def red(video: torch.Tensor) -> np.ndarray:
    """The frame each uint8 view shows (the fixture's red channel is frame * 7), (..., T)."""
    return (video[..., 0, :, 0, 0].numpy().astype(int) // 7).astype(int)


def test_items_hold_n_clips_under_each_augmentation_and_the_global_clip(shards):
    item = dataset(shards)[(0, 5)]
    assert item["video"].shape == (2, 4, 3, 8, 16, 16) and item["video"].dtype == torch.uint8
    assert item["global"].shape == (2, 3, 32, 16, 16)
    assert item["label"] == 5 % 3
    withheld = ssl_dataset(shards, np.arange(12), SSL, kind="invariant", seed=0, train=True)
    assert withheld[0]["label"] == -1  # self-supervised: the teachers never see a label
    # local clip t is 8 consecutive frames of window t, in time order, the same frames in both
    # augmentations (only crops differ); the global clip is every frame
    assert (red(item["video"][0]) == item["frames"].numpy()).all()
    assert (red(item["video"][1]) == item["frames"].numpy()).all()
    assert (item["frames"].numpy() == np.arange(32).reshape(4, 8)).all()
    assert (red(item["global"][0]) == np.arange(32)).all()


def test_global_slices_cover_the_local_windows_when_clips_are_shorter(shards):
    item = dataset(shards, num_clips=2, clip_frames=4, global_frames=16)[(1, 2)]
    local, spread = item["frames"].numpy(), item["global_frames"].numpy()
    for t, slice_frames in enumerate(spread.reshape(2, 8)):  # the backbone's t-th time slice
        window = (slice_frames.min(), slice_frames.max())
        assert window[0] <= local[t].min() and local[t].max() <= window[1] + 1
        assert t * 16 <= local[t].min() and local[t].max() < (t + 1) * 16


def test_augmentations_crop_independently_and_testing_is_fixed(shards):
    item = dataset(shards)[(0, 1)]
    blue = item["video"][:, :, 2, 0, 0, :].float()  # the blue ramp shows each crop's left edge
    assert len({tuple(row.tolist()) for row in blue.reshape(-1, 16)}) > 1
    fixed = {"train": False, "augmentations": 1}
    a, b = dataset(shards, **fixed)[3], dataset(shards, **fixed, seed=9)[3]
    assert a["video"].shape[0] == 1 and torch.equal(a["video"], b["video"])
    assert "global" not in dataset(shards, global_augmentations=0)[0]
    assert torch.equal(dataset(shards)[(2, 4)]["video"], dataset(shards)[(2, 4)]["video"])


def test_ssl_colour_augmentation_changes_training_views_only(shards):
    jitter = SSL | {"augment": {"ops": ["brightness"], "p": 1.0, "noise_std": 0.1}}
    rows = np.arange(12)
    plain = ssl_dataset(shards, rows, SSL, kind="invariant", seed=0, train=True)[(0, 3)]
    jittered = ssl_dataset(shards, rows, jitter, kind="invariant", seed=0, train=True)[(0, 3)]
    means = jittered["video"].float().mean(dim=(2, 3, 4, 5)) / plain["video"].float().mean(
        dim=(2, 3, 4, 5)
    )  # one brightness factor per clip of each augmentation: drawn clip by clip
    assert not torch.allclose(means, torch.ones_like(means), atol=0.02)
    assert len({round(m, 3) for m in means.flatten().tolist()}) > 1
    test = {"kind": "invariant", "seed": 0, "train": False}
    assert torch.equal(
        ssl_dataset(shards, rows, SSL, **test)[3]["video"],
        ssl_dataset(shards, rows, jitter, **test)[3]["video"],
    )


def test_videos_too_short_for_the_clips_are_an_error_naming_the_param(tmp_path):
    short = write_test_shards(tmp_path / "s", [fixture_frames(0, 3, 24, 32)] * 3, [0, 1, 2])
    with pytest.raises(DataError, match="num_clips"):
        MultiClipDataset(
            short,
            rows=[0, 1, 2],
            num_clips=4,
            clip_frames=2,
            stride=1,
            global_frames=4,
            augmentations=1,
            global_augmentations=0,
            crop_size=16,
            train=True,
        )


@pytest.mark.parametrize("kind", ["invariant", "distinctive"])
def test_ssl_teacher_run_writes_backbone_head_and_metrics(shards, tmp_path, kind):
    run = tmp_path / kind
    metrics = pretrain_ssl_teacher(
        kind=kind,
        shard_dir=shards,
        run_dir=run,
        split=1,
        model=TINY_MODEL,
        ssl=SSL,
        train=TRAIN,
        seed=0,
        threads=1,
        params={"test": kind},
    )
    assert {p.name for p in run.iterdir()} >= {"model.pt", "head.pt", "metrics.json"}
    assert not (run / "checkpoints").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["teacher"] == kind and saved["ssl_videos"] == 8 == metrics["ssl_videos"]
    terms = {
        "invariant": ["train_instance_local"],
        "distinctive": ["train_local_local", "train_global_local"],
    }
    assert all(np.isfinite(saved["history"][0][name]) for name in terms[kind])
    teacher = load_ssl_teacher(run, kind, TINY_MODEL, SSL)
    assert not teacher.training


def test_loading_a_teacher_under_other_params_names_the_file(shards, tmp_path):
    run = tmp_path / "run"
    pretrain_ssl_teacher(
        kind="invariant", shard_dir=shards, run_dir=run, split=1, model=TINY_MODEL, ssl=SSL,
        train=TRAIN, seed=0, threads=1, params={},
    )  # fmt: skip
    with pytest.raises(DataError, match="head.pt"):
        load_ssl_teacher(run, "invariant", TINY_MODEL, SSL | {"embed_dim": 16})


def test_similarity_table_has_one_score_per_video(shards, tmp_path):
    runs = {}
    for kind in ("invariant", "distinctive"):
        runs[kind] = tmp_path / kind
        pretrain_ssl_teacher(
            kind=kind, shard_dir=shards, run_dir=runs[kind], split=1, model=TINY_MODEL,
            ssl=SSL, train=TRAIN, seed=0, threads=1, params={},
        )  # fmt: skip
    teachers = {kind: (kind, run, SSL) for kind, run in runs.items()}
    common = {"shard_dir": shards, "teachers": teachers, "split": 1, "model": TINY_MODEL}
    table = similarity_table(**common, clamp=False, threads=1)
    assert len(table) == 12 and set(table["split"]) == {"train", "test"}
    assert table["s"].between(-1, 1).all()
    assert np.allclose(table["s"], (table["score_invariant"] + table["score_distinctive"]) / 2)
    clamped = similarity_table(**common, clamp=True, threads=1)
    assert clamped["s"].between(0, 1).all()
    assert np.allclose(clamped["s"], table["s"].clip(0, 1))
    again = similarity_table(**common, clamp=False, threads=1)
    pd.testing.assert_frame_equal(table, again)  # a fixed property of the video and teachers


def test_motion_only_report_says_whether_those_classes_score_lower():
    rng = np.random.default_rng(0)
    names = np.repeat(["WalkLeft", "SitDown", "Clap", "Jump"], 30)
    s = np.where(np.isin(names, ["WalkLeft", "SitDown"]), 0.3, 0.7) + rng.normal(0, 0.05, 120)
    table = pd.DataFrame({"label_name": names, "s": s})
    report = motion_only_report(table, ["WalkLeft", "WalkRight", "SitDown", "StandUp"])
    assert report["motion_only"]["lower"] == "yes"
    assert report["motion_only"]["classes"] == ["WalkLeft", "SitDown"]
    assert report["motion_only"]["difference"] == pytest.approx(-0.4, abs=0.03)
    flat = table.assign(s=rng.normal(0.5, 0.05, 120))
    assert (
        motion_only_report(flat, ["WalkLeft", "SitDown"])["motion_only"]["lower"] == "within noise"
    )
    assert isinstance(motion_only_report(table, ["Dance"])["motion_only"], str)


def test_student_epochs_hold_every_labeled_video_and_as_many_unlabeled(shards):
    from pipeline.data.samplers import DenseSampler
    from pipeline.timebalance import StudentClipDataset

    scores = np.linspace(0, 1, 12)
    data = StudentClipDataset(
        shards,
        labeled_rows=np.array([1, 2]),
        unlabeled_rows=np.array([4, 5, 7, 8, 10]),
        scores=scores,
        sampler=DenseSampler(4, 2, train=True),
        crop_size=16,
        seed=0,
        flip=True,
    )
    assert len(data) == 4
    epochs = [[data[(epoch, k)] for k in range(4)] for epoch in range(6)]
    for items in epochs:
        assert [item["index"] for item in items[:2]] == [1, 2]
        assert [item["label"] for item in items[:2]] == [1 % 3, 2 % 3]
        unlabeled = [item["index"] for item in items[2:]]
        assert len(set(unlabeled)) == 2 and set(unlabeled) <= {4, 5, 7, 8, 10}
        assert all(item["label"] == -1 for item in items[2:])
        assert all(item["score"] == pytest.approx(scores[item["index"]]) for item in items)
    assert len({tuple(item["index"] for item in items[2:]) for items in epochs}) > 1
    with pytest.raises(DataError, match="scores"):
        StudentClipDataset(shards, labeled_rows=np.array([1]), unlabeled_rows=np.array([4]),
                           scores=scores[:5], sampler=DenseSampler(4, 2, train=True),
                           crop_size=16)  # fmt: skip


def test_student_run_distils_the_fine_tuned_teachers(shards, tmp_path):
    from pipeline.dag import RunSpec
    from pipeline.finetune import ClipSpec, train_run

    clips = ClipSpec(frames=4, stride=2, crop=16, test_clips=2, three_crop=False)
    common = {
        "run": RunSpec("supervised", 0, augment=False),
        "split": 1,
        "clips": clips,
        "model": TINY_MODEL,
        "train": TRAIN | {"epochs": 2, "batch_size": 2, "val_fraction": 0.2, "optimizer": "sgd"},
        "augment": None,
        "threads": 1,
        "params": {},
        "labeled_percent": 50,
    }
    teachers = {}
    for kind in ("invariant", "distinctive"):
        train_run(shards, tmp_path / kind, **common)
        teachers[kind] = tmp_path / kind / "model.pt"
    scores = tmp_path / "s.parquet"
    manifest = pd.read_parquet(shards / "manifest.parquet")
    pd.DataFrame({"video_id": manifest["video_id"], "s": np.linspace(-0.2, 0.9, 12)}).to_parquet(
        scores
    )
    student = {
        "teachers": teachers,
        "scores": scores,
        "variant": "both",
        "reweight": True,
        "distance": "l2",
        "class_reduction": "mean",
        "omega_labeled": 50.0,
        "omega_unlabeled": 100.0,
    }
    metrics = train_run(shards, tmp_path / "student", **common, student=student)
    epoch = metrics["last_epoch"]
    assert epoch["train_distill_unlabeled"] > 0 and np.isfinite(epoch["train_ce"])
    assert "test" in metrics and (tmp_path / "student" / "confusion.png").exists()
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"video_id": manifest["video_id"][::-1], "s": 0.5}).to_parquet(bad)
    with pytest.raises(DataError, match="run tb_similarity again"):
        train_run(shards, tmp_path / "bad", **common, student=student | {"scores": bad})
