"""DTG-Net's tables are assembled from the runs' metrics files, and say what was measured."""

import json

import numpy as np
import pytest

from pipeline.config import validate_params
from pipeline.dag import ALL_TEACHERS, dtg_tables
from pipeline.errors import DataError
from pipeline.tables import dtg_table, paired_verdict, teacher_table
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
    assert table.loc["BU", "vs_Scratch"] == pytest.approx(20.0)
    assert table.loc["All", "DataSize"] == 100 + 200 + 300 + 400
    assert table.loc["Scratch", "DataSize"] == 0 and table.loc["Scratch", "teachers"] == "none"
    assert table.loc["ImageNet+Places", "weights"] == "imagenet 0.5, places 0.5"
    assert table.loc["BU", "beats_Scratch"] == "yes"
    assert table.loc["Places", "beats_Scratch"] == "no"
    assert table.loc["All", "beats_Scratch"] == "within noise"
    assert table.loc["BU", "beats_All"] == "yes" and table.loc["All offline", "vs_All"] == 0.0
    assert table.loc["All offline", "paper_acc@1"] == 63.28
    assert table.loc["BU", "probe@1_mean"] == pytest.approx(20.5)


def test_a_missing_run_is_an_error_not_a_skipped_row(tmp_path):
    rows = dtg_tables(_params([0]))["table3"]
    run_dirs, teacher_dirs = _fake_runs(tmp_path, rows, lambda label, seed: 0.2)
    (run_dirs[rows[3][1].name] / "metrics.json").unlink()
    with pytest.raises(DataError, match="metrics.json"):
        dtg_table("table3", rows, run_dirs, teacher_dirs)


def test_paired_verdict_is_a_paired_t_test_over_seeds():
    assert paired_verdict([5.0]) == "one seed"
    assert paired_verdict([5.0, 6.0, 4.0]) == "yes"  # mean 5, se 0.58: t 8.7 > 4.30
    assert paired_verdict([1.0, 3.0, -1.0]) == "within noise"  # t 0.87
    assert paired_verdict([5.0, 1.0, 0.5]) == "within noise"  # t 1.9: two SE is not enough
    assert paired_verdict([-5.0, -6.0, -4.0]) == "no"


def test_paired_comparison_resolves_what_independent_spreads_cannot(tmp_path):
    # Seeds move both rows together (seed 2 is a hard seed): the spread over seeds is 10 points,
    # the per-seed gain a steady 2.
    rows = dtg_tables(_params([0, 1, 2]))["table3"]
    run_dirs, teacher_dirs = _fake_runs(
        tmp_path, rows, lambda label, seed: 0.2 + 0.1 * seed + (0.02 if label == "BU" else 0.0)
    )
    table = dtg_table("table3", rows, run_dirs, teacher_dirs).set_index("row")
    assert table.loc["BU", "acc@1_std"] == pytest.approx(10.0)
    assert table.loc["BU", "vs_Scratch"] == pytest.approx(2.0)
    assert table.loc["BU", "vs_Scratch_se"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc["BU", "beats_Scratch"] == "yes"
    assert table.loc["Places", "beats_Scratch"] == "within noise"


def test_teacher_probe_rows_and_transfer(tmp_path):
    rows = dtg_tables(_params([0, 1]))["table3"]
    run_dirs, teacher_dirs = _fake_runs(tmp_path, rows, lambda label, seed: 0.2)
    probes = {}
    for value, name in zip((10.0, 15.0, 40.0, 20.0), ALL_TEACHERS, strict=True):
        probes[name] = tmp_path / "probes" / name
        _write(probes[name], {"test": {"top1": value}})
    table = dtg_table("table3", rows, run_dirs, teacher_dirs, probes).set_index("row")
    assert table.loc["Teacher probe: BU", "probe@1_mean"] == 40.0
    assert np.isnan(table.loc["Teacher probe: BU", "acc@1_mean"])
    assert table.loc["BU", "probe@1_mean"] == pytest.approx(10.0)  # 50 * top1
    assert table.loc["BU", "transfer"] == pytest.approx(10.0 / 40.0)
    assert table.loc["ImageNet+Places", "transfer"] == pytest.approx(10 / 15, abs=1e-3)  # best
    assert np.isnan(table.loc["Scratch", "transfer"])


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


def test_table4_has_no_probe_rows_and_its_figure_draws(tmp_path):
    from pipeline.dag import table_probes
    from pipeline.tables import write_dtg_table

    rows = dtg_tables(_params([0, 1]))["table4"]
    run_dirs, teacher_dirs = _fake_runs(tmp_path, rows, lambda label, seed: 0.2 + 0.01 * seed)
    assert table_probes("table4") == ()
    table = write_dtg_table("table4", rows, run_dirs, teacher_dirs, {}, tmp_path / "t4.csv",
                            tmp_path / "t4.png")  # fmt: skip
    assert list(table["row"]) == ["Supervised", "Supervised DTG"]
    assert (tmp_path / "t4.png").stat().st_size > 1000
