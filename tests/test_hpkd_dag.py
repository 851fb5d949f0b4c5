"""The human-parsing KD method in the stage registry: its runs, what each reads, its tables."""

import json
import shlex

import pandas as pd
import pytest

from pipeline.cli import build_parser
from pipeline.config import ConfigError, Params, load_params, validate_params
from pipeline.dag import HPKDRun, build_stages, hpkd_tables
from pipeline.tables import HPKD_REFERENCES, hpkd_table
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def stages(params):
    return {stage.name: stage for stage in build_stages(params)}


def test_each_stage_command_names_its_run(stages):
    runs = [
        s for name, s in stages.items() if name.startswith(("hpkd_pretrain_", "hpkd_finetune_"))
    ]
    assert len(runs) == 12 + 18 + 6  # table 1: 12 pre-trainings, 18 fine-tunes; table 2: TI
    for stage in runs:
        args = build_parser().parse_args(shlex.split(stage.cmd.split(" -m pipeline ")[1]))
        run = HPKDRun(args.variant, args.backbone, args.seed)
        assert stage.name.endswith(f"_synth_{run.where}")
        folder = run.pretrain_name if stage.name.startswith("hpkd_pretrain_") else run.name
        assert stage.outs[0] == f"results/runs/synth/{folder}/model.pt"


def test_kd_variants_read_the_parsing_cache_and_the_baselines_do_not(stages):
    cache = "data/features/synth/schp/"
    full = stages["hpkd_pretrain_synth_full_c3d_s0"]
    assert cache in full.deps and "results/teachers/schp/model.pt" in full.deps
    assert "results/runs/synth/hpkd_pre_full_c3d_s0/parts.png" in full.outs
    rsp = stages["hpkd_pretrain_synth_rsp_c3d_s0"]
    assert cache not in rsp.deps and not any(o.endswith("parts.png") for o in rsp.outs)
    assert "results/runs/synth/hpkd_pre_full_c3d_s0/model.pt" in (
        stages["hpkd_finetune_synth_full_c3d_s0"].deps
    )
    assert stages["hpkd_finetune_synth_scratch_c3d_s0"].deps == ("data/shards/synth/",)
    # fine-tuning params do not rerun the pre-training
    assert "hpkd.finetune" not in full.params and "hpkd.pretrain" in full.params


def test_rows_are_the_papers_and_table_2_reuses_table_1s_runs(params):
    tables = hpkd_tables(params)
    one = {(label, run.backbone) for label, run in tables["hpkd_table1"] if run.seed == 0}
    assert one == {(label, b) for label in ("Scratch", "RSP only (no KD)", "Full")
                   for b in ("c3d", "r2plus1d")}  # fmt: skip
    two = dict((label, run) for label, run in tables["hpkd_table2"] if run.seed == 0)
    assert two == {"w/o KD": HPKDRun("rsp", "r2plus1d", 0), "TI": HPKDRun("ti", "r2plus1d", 0),
                   "Full": HPKDRun("full", "r2plus1d", 0)}  # fmt: skip
    assert two["Full"] in [run for _, run in tables["hpkd_table1"]]


def test_the_table_compares_each_backbones_rows_with_its_references(params, tmp_path):
    rows = hpkd_tables(params)["hpkd_table1"]
    run_dirs = {}
    for i, (_, run) in enumerate(rows):
        run_dirs[run.name] = tmp_path / run.name
        run_dirs[run.name].mkdir()
        top1 = 0.2 + 0.05 * (i % 3) + 0.01 * run.seed
        metrics = {"test": {"video_top1": top1, "video_top5": 0.6, "video_map": 0.3},
                   "init_probe": {"top1": 10.0}}  # fmt: skip
        (run_dirs[run.name] / "metrics.json").write_text(json.dumps(metrics))
    table = hpkd_table("hpkd_table1", rows, run_dirs)
    assert list(table["backbone"]) == ["c3d"] * 3 + ["r2plus1d"] * 3
    for reference in HPKD_REFERENCES["hpkd_table1"]:
        compared = table[table["row"] != reference]
        assert compared[f"beats_{reference}"].isin(["yes", "no", "within noise"]).all()
    full = table[(table["row"] == "Full") & (table["backbone"] == "c3d")].iloc[0]
    assert full["acc@1_mean"] == pytest.approx(31.0) and full["beats_Scratch"] == "yes"
    assert full["paper_acc@1"] == 80.4 and pd.isna(table.loc[0, "paper_acc@1"])


def test_c3d_params_must_leave_the_resnet_keys_unset():
    raw = load_params(ROOT / "params.yaml").model_dump()
    raw["hpkd"]["backbones"]["c3d"]["layers"] = [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="hpkd.backbones.c3d"):
        validate_params(raw)
    assert isinstance(Params.model_validate(load_params(ROOT / "params.yaml").model_dump()), Params)
