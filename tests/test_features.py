import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data.shards import ShardStore
from pipeline.errors import DataError
from pipeline.inspect import describe
from pipeline.io import partial_folder
from pipeline.models import resnet_2d
from pipeline.teachers import features
from pipeline.teachers.base import FrozenTeacher, Preprocess
from pipeline.teachers.features import FeatureCache, build_feature_cache
from tests.test_clips import fixture_videos, write_test_shards

SHA = "a" * 64
NUM_PARTS = 3
PARTS_SIZE = 4


class TinyParser(nn.Module):
    """A parsing network's interface at toy size: pooled features and per-pixel part logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)
        self.head = nn.Conv2d(6, NUM_PARTS, kernel_size=1)

    def features_and_parts(self, x):
        hidden = self.conv(x).relu()
        return hidden.mean(dim=(2, 3)), self.head(hidden)


def classifier_teacher() -> FrozenTeacher:
    torch.manual_seed(0)
    network = resnet_2d(
        "resnet18", num_classes=0, width=4, layers=(1, 1, 1, 1), stem_stride=1, stem_pool=False
    )
    return FrozenTeacher("tiny", network, Preprocess(size=16), feature_dim=network.feature_dim)


def parsing_teacher() -> FrozenTeacher:
    torch.manual_seed(0)
    return FrozenTeacher(
        "parser",
        TinyParser(),
        Preprocess(color="bgr", size=16),
        kind="parsing",
        feature_dim=6,
        parts_size=PARTS_SIZE,
    )


@pytest.fixture(params=["raw", "jpeg"])
def shard_dir(request, tmp_path) -> Path:
    # JPEG: mixed frame sizes, so batches must not cross a size change
    videos, labels = fixture_videos(mixed_sizes=request.param == "jpeg")
    return write_test_shards(tmp_path / "shards", videos, labels, codec=request.param)


def build(shard_dir: Path, out_dir: Path, teacher=None, sha: str = SHA) -> dict:
    return build_feature_cache(
        shard_dir=shard_dir,
        teacher=teacher or classifier_teacher(),
        checkpoint_sha256=sha,
        out_dir=out_dir,
        dataset="fixture",
        batch_size=16,  # batches span videos and split them
    )


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cached_outputs_equal_the_teacher_on_each_frame(shard_dir, tmp_path):
    teacher = classifier_teacher()
    summary = build(shard_dir, tmp_path / "cache", teacher)
    store, cache = ShardStore(shard_dir), FeatureCache(tmp_path / "cache", shard_dir)
    assert summary["frames"] == 217 and summary["feature_dim"] == cache.feature_dim == 32
    assert [s["rows"] for s in summary["shards"]] == [
        store.manifest.query(f"shard == {s}")["num_frames"].sum() for s in (0, 1)
    ]
    for row in range(len(store)):  # every video of both shards: alignment across them
        frames = np.arange(store.num_frames(row))
        direct = teacher(torch.from_numpy(np.ascontiguousarray(store.read_clip(row, frames))))
        cached = cache.read(row, frames)
        assert set(cached) == {"embedding"} and cached["embedding"].dtype == np.float32
        np.testing.assert_allclose(cached["embedding"], direct["embedding"], rtol=2e-3, atol=2e-3)
    with h5py.File(tmp_path / "cache" / "feat-00001.h5", "r") as file:
        assert file["embedding"].dtype == np.float16
        assert file["embedding"].shape == (summary["shards"][1]["rows"], 32)
        assert file.attrs["key"] == summary["key"] and file.attrs["shard_key"] == "k0"


def test_parsing_teacher_caches_part_probabilities(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "shards", videos, labels)
    teacher = parsing_teacher()
    summary = build(shard_dir, tmp_path / "cache", teacher)
    assert summary["num_parts"] == NUM_PARTS and summary["parts_size"] == PARTS_SIZE
    cache, store = FeatureCache(tmp_path / "cache", shard_dir), ShardStore(shard_dir)
    frames = np.array([0, 3, 8])
    out = cache.read(4, frames)
    assert out["embedding"].shape == (3, 6)
    assert out["parts"].shape == (3, NUM_PARTS, PARTS_SIZE, PARTS_SIZE)
    np.testing.assert_allclose(out["parts"].sum(axis=1), 1.0, atol=3e-3)
    direct = teacher(torch.from_numpy(store.read_clip(4, frames)))
    np.testing.assert_allclose(out["parts"], direct["parts"], atol=1e-3)


def test_rerun_rewrites_nothing_and_a_new_checkpoint_rebuilds(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "shards", videos, labels)
    out = tmp_path / "cache"
    first = build(shard_dir, out)
    before = mtimes(out)
    assert build(shard_dir, out) == first
    assert mtimes(out) == before

    second = build(shard_dir, out, sha="b" * 64)
    assert second["key"] != first["key"] and second["build"]["shards_written"] == 2
    for name in ("feat-00000.h5", "feat-00001.h5"):
        with h5py.File(out / name, "r") as file:
            assert file.attrs["key"] == second["key"]
    assert sorted(mtimes(out)) == sorted(before)  # no temp files left


def test_killed_build_leaves_no_cache_json_and_resumes(tmp_path, monkeypatch):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "shards", videos, labels)
    out = tmp_path / "cache"
    write_feat_file = features._write_feat_file
    written = []

    def killed_after_first_shard(path, **kwargs):
        if written:
            raise KeyboardInterrupt
        write_feat_file(path, **kwargs)
        written.append(path)

    monkeypatch.setattr(features, "_write_feat_file", killed_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        build(shard_dir, out)
    # The finished file waits beside the output, where Snakemake's cleanup of an unfinished
    # job's output does not reach it.
    assert not out.exists()
    assert sorted(p.name for p in partial_folder(out).iterdir()) == ["feat-00000.h5"]
    with pytest.raises(DataError, match="cache.json: missing"):
        FeatureCache(out, shard_dir)

    monkeypatch.setattr(features, "_write_feat_file", write_feat_file)
    kept = (partial_folder(out) / "feat-00000.h5").stat().st_mtime_ns
    summary = build(shard_dir, out)
    assert summary["build"]["shards_kept"] == 1 and summary["build"]["shards_written"] == 1
    assert (out / "feat-00000.h5").stat().st_mtime_ns == kept
    assert not partial_folder(out).exists()
    assert json.loads((out / "cache.json").read_text()) == summary
    assert FeatureCache(out, shard_dir).read(1, [0])["embedding"].shape == (1, 32)


def test_read_takes_any_index_shape_and_rejects_frames_outside_the_video(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "shards", videos, labels)
    build(shard_dir, tmp_path / "cache")
    cache = FeatureCache(tmp_path / "cache", shard_dir)
    views = np.array([[0, 5, 5, 20], [24, 1, 2, 3]])  # unsorted and repeated, as samplers may
    out = cache.read(1, views)["embedding"]
    assert out.shape == (2, 4, 32)
    np.testing.assert_array_equal(out.reshape(8, 32), cache.read(1, views.ravel())["embedding"])
    np.testing.assert_array_equal(out[0, 1], out[0, 2])
    assert not np.array_equal(out[0, 0], out[0, 1])
    # video 1 has 25 frames; the next video in its shard starts at the row after its last frame
    with pytest.raises(IndexError, match="manifest row 1"):
        cache.read(1, [0, 25])
    with pytest.raises(IndexError, match="manifest row 1"):
        cache.read(1, [-1])
    with pytest.raises(IndexError, match="manifest row 6"):
        cache.read(6, [0])


def test_stale_cache_is_refused_by_the_reader(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "shards", videos, labels)
    build(shard_dir, tmp_path / "cache")
    with pytest.raises(DataError, match="built from checkpoint sha256 aaaaaaaaaaaa"):
        FeatureCache(tmp_path / "cache", shard_dir, checkpoint_sha256="c" * 64)
    with h5py.File(shard_dir / "shard-00001.h5", "a") as file:
        file.attrs["key"] = "k1"  # re-ingested with other params
    with pytest.raises(DataError, match=r"stale: shard-00001.h5 .* rebuild it with the features"):
        FeatureCache(tmp_path / "cache", shard_dir)
    summary = build(shard_dir, tmp_path / "cache")  # rebuilt, not reused
    assert summary["build"]["shards_written"] == 2
    FeatureCache(tmp_path / "cache", shard_dir)


def test_cache_pickles_with_its_files_open(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "shards", videos, labels)
    build(shard_dir, tmp_path / "cache")
    cache = FeatureCache(tmp_path / "cache", shard_dir)
    expected = cache.read(3, [0, 4, 8])["embedding"]  # opens shard 1's feat file
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.read(3, [0, 4, 8])["embedding"], expected)
    cache.close()


def test_describe_feature_cache(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    shard_dir = write_test_shards(tmp_path / "shards", videos, labels)
    summary = build(shard_dir, tmp_path / "cache", parsing_teacher())
    text = describe(tmp_path / "cache")
    assert f"feature cache {tmp_path / 'cache'} (dataset fixture, teacher parser)" in text
    assert f"key           {summary['key']}" in text
    assert f"checkpoint    sha256 {SHA}" in text
    assert "frames        217 in 2 shards" in text
    assert "embedding     (217, 6) float16" in text
    assert "parts         (217, 3, 4, 4) float16" in text
    assert "per 1,000 frames" in text

    (tmp_path / "cache" / "cache.json").unlink()
    assert "INCOMPLETE" in describe(tmp_path / "cache")
