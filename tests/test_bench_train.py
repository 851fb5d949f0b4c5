import math

import pytest
import torch

from pipeline.bench.train import GOAL_MAX_LOADER_COST, bench_train
from pipeline.errors import DataError
from tests.test_clips import fixture_frames, write_test_shards

TINY_MODEL = {"name": "r3d_18", "width": 4, "layers": [1, 1, 1, 1], "stem_stride": 4}
CLIPS = {"frames": 4, "stride": 2, "crop": 16}


@pytest.fixture
def shard_dir(tmp_path):
    # 12 videos of 3 classes; write_test_shards puts two thirds in split1's train set.
    videos = [fixture_frames(v, 12, 20, 24) for v in range(12)]
    return write_test_shards(tmp_path / "shards", videos, [v % 3 for v in range(12)])


def test_bench_train_reports_both_sides_and_the_loader_cost(shard_dir, capsys):
    threads_before = torch.get_num_threads()
    result = bench_train(
        shard_dir,
        **CLIPS,
        model=TINY_MODEL,
        batch_size=2,
        steps=3,
        threads=1,
        workers=(0, 1),
        val_fraction=0.0,
    )
    assert torch.get_num_threads() == threads_before
    assert result["train_videos"] == 8
    assert result["batches_per_epoch"] == 4
    # One in-memory run before the loader runs and one after each.
    assert len(result["in_memory_runs_clips_per_s"]) == 3
    assert all(rate > 0 for rate in result["in_memory_runs_clips_per_s"])
    assert set(result["loader_by_workers"]) == {0, 1}
    for run in result["loader_by_workers"].values():
        assert run["clips_per_s"] > 0
        reference = run["in_memory_clips_per_s"]
        assert math.isclose(
            run["loader_cost_percent"], 100 * (reference - run["clips_per_s"]) / reference
        )
        assert run["goal_met"] == (run["loader_cost_percent"] <= GOAL_MAX_LOADER_COST)
    printed = capsys.readouterr().out
    assert "shard loader, workers=0" in printed and "shard loader, workers=1" in printed
    assert "loader cost" in printed


def test_bench_train_uses_the_runs_train_rows_without_validation(shard_dir):
    # Validation is carved from the 8 train videos, as a training run does: fewer than a batch
    # of 8 remain.
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        bench_train(
            shard_dir, **CLIPS, model=TINY_MODEL, batch_size=8, steps=3, threads=1, workers=(0,)
        )
