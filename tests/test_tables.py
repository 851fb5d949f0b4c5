"""DTG-Net's tables are assembled from the runs' metrics files, and say what was measured."""

import json

import numpy as np
import pytest

from pipeline.config import validate_params
from pipeline.dag import ALL_TEACHERS, dtg_tables
from pipeline.errors import DataError
from pipeline.tables import _verdict, dtg_table, teacher_table
from tests.conftest import ROOT


def _params(seeds):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tables"]["table3"]["seeds"] = list(seeds)
    return validate_params(raw)


def _write(path, obj):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(obj))


def _fake_runs(tmp_path, rows, accuracy):
    run_dirs = {}
    for label, run in rows:
        top1 = accuracy(label, run.seed)
        run_dirs[run.name] = tmp_path / run.name
        _write(run_dirs[run.name], {"test": {"video_top1": top1, "video_top5": min(1.0, top1 + 0.3),
                                             "video_map": top1 / 2},
                                    "init_probe": {"top1": 50 * top1}})  # fmt: skip
        if run.pretrained is not None:
            n = len(run.pretrained.teachers)
            run_dirs[run.pretrained.name] = tmp_path / run.pretrained.name
            _write(run_dirs[run.pretrained.name],
                   {"weights": {t: 1 / n for t in run.pretrained.teachers}})  # fmt: skip
    teacher_dirs = {}
    for size, name in enumerate(ALL_TEACHERS, start=1):
        teacher_dirs[name] = tmp_path / "teachers" / name
        _write(teacher_dirs[name], {"train_size": 100 * size})
    return run_dirs, teacher_dirs


def test_table3_rows_sizes_weights_and_verdicts(tmp_path):
    rows = dtg_tables(_params([0, 1, 2]))["table3"]

    def accuracy(label, seed):  # BU is clearly better, Places clearly worse, the rest noise
        base = {"BU": 0.40, "Places": 0.10}.get(label, 0.20)
        return base + 0.01 * seed

    run_dirs, teacher_dirs = _fake_runs(tmp_path, rows, accuracy)
    table = dtg_table("table3", rows, run_dirs, teacher_dirs).set_index("row")
    assert len(table) == 11 and (table["seeds"] == 3).all()
    assert table.loc["BU", "acc@1_mean"] == pytest.approx(41.0)
    assert table.loc["BU", "acc@1_std"] == pytest.approx(1.0)
    assert table.loc["All", "DataSize"] == 100 + 200 + 300 + 400
    assert table.loc["Scratch", "DataSize"] == 0 and table.loc["Scratch", "teachers"] == "none"
    assert table.loc["ImageNet+Places", "weights"] == "imagenet 0.5, places 0.5"
    assert table.loc["BU", "beats_Scratch"] == "yes"
    assert table.loc["Places", "beats_Scratch"] == "no"
    assert table.loc["All", "beats_Scratch"] == "within noise"
    assert table.loc["All offline", "paper_acc@1"] == 63.28
    assert table.loc["BU", "probe@1_mean"] == pytest.approx(20.5)


def test_a_missing_run_is_an_error_not_a_skipped_row(tmp_path):
    rows = dtg_tables(_params([0]))["table3"]
    run_dirs, teacher_dirs = _fake_runs(tmp_path, rows, lambda label, seed: 0.2)
    (run_dirs[rows[3][1].name] / "metrics.json").unlink()
    with pytest.raises(DataError, match="metrics.json"):
        dtg_table("table3", rows, run_dirs, teacher_dirs)


def test_verdict_needs_two_seeds_and_twice_the_standard_error():
    assert _verdict(5.0, 1.0, 1.0, 1, 3) == "one seed"
    assert _verdict(5.0, 1.0, 1.0, 3, 3) == "yes"  # se = 0.82
    assert _verdict(1.0, 1.0, 1.0, 3, 3) == "within noise"
    assert _verdict(-5.0, 1.0, 1.0, 3, 3) == "no"


def test_teachers_table(tmp_path):
    names = ["imagenet", "schp"]
    teacher_dirs, caches = {}, {}
    for name, score in zip(names, ({"top1": 62.6}, {"miou": 53.2}), strict=True):
        teacher_dirs[name] = tmp_path / "t" / name
        _write(teacher_dirs[name], {"source": {"kind": "synthetic", "path": "p"}, "kind": "x",
                                    "train_size": 10, **score})  # fmt: skip
        caches[name] = tmp_path / "c" / name
        caches[name].mkdir(parents=True)
        summary = {"feature_dim": 64, "bytes": 2048, "frames": 16, "checkpoint_sha256": "ab"}
        (caches[name] / "cache.json").write_text(json.dumps(summary))
    table = teacher_table(names, teacher_dirs, caches)
    assert list(table["metric"]) == ["top1", "mIoU"] and list(table["source"]) == ["synthetic"] * 2
    assert np.allclose(table["score"], [62.6, 53.2])
    assert list(table["cache_bytes_per_1000_frames"]) == [128000, 128000]
