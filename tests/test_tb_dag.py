"""TimeBalance's tables in the stage registry: which runs each row is, what each run reads, and
the table built from the runs' metrics."""

import json
import shlex

import pandas as pd
import pytest

from pipeline.cli import build_parser, tb_run_of
from pipeline.config import Params, budget_epochs, load_params
from pipeline.dag import TB_PAIR, TBRun, build_stages, tb_similarity_outs, tb_tables
from pipeline.tables import TB_REFERENCES, tb_table
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def stages(params):
    return {stage.name: stage for stage in build_stages(params)}


def _run_of(stage) -> TBRun:
    return tb_run_of(build_parser().parse_args(shlex.split(stage.cmd.split(" -m pipeline ")[1])))


def test_each_run_stage_command_rebuilds_the_run_it_is_named_after(stages):
    runs = [s for name, s in stages.items() if name.startswith(("tb_finetune_", "tb_student_"))]
    assert len(runs) > 50
    for stage in runs:
        run = _run_of(stage)
        assert stage.name.endswith(f"_synth_{run.name}")
        assert stage.outs[0] == f"results/runs/synth/{run.name}/model.pt"


def test_rows_are_the_papers(params):
    tables = tb_tables(params)
    first = {label: run for label, run in tables["tb_table2"] if run.percent == 5 and not run.seed}
    assert first["f_S"] == TBRun("tclr", 5, 0)
    assert first["f_I"] == TBRun("invariant", 5, 0)
    assert first["S+D"] == TBRun("tclr", 5, 0, ("distinctive",))
    assert first["S+I+D averaged"].teachers == TB_PAIR and not first["S+I+D averaged"].reweight
    assert first["S+I+D reweighted"] == TBRun("tclr", 5, 0, TB_PAIR, reweight=True)
    # table 3 has no fine-tuned teachers of its own rows, and its student starts from random
    assert {run.init for _, run in tables["tb_table3"]} == {"random"}
    pairs = {label: run.teachers for label, run in tables["tb_table4"]}
    assert pairs["Inv1+Inv2"] == ("invariant", "invariant2")
    assert pairs["Inv1+Dist2"] == ("invariant", "distinctive2")
    assert {run.init for _, run in tables["tb_table5"]} == {
        "invariant", "invariant_n2", "distinctive", "distinctive_n2"
    }  # fmt: skip
    distances = {label: run.distance for label, run in tables["tb_table6"]}
    assert distances == {"L2": "", "KL": "kl", "JS": "js"}  # L2, the default: table 2's run
    # the full student of table 1 is table 2's run: one run, two tables
    assert first["S+I+D reweighted"] in [run for _, run in tables["tb_table1"]]
    assert {run.percent for _, run in tables["tb_table1"]} == {5, 10, 20, 50}
    names = [run.name for rows in tables.values() for _, run in rows]
    assert len(set(names)) == len({run for rows in tables.values() for _, run in rows})


def test_a_student_reads_its_pairs_score_and_its_teachers_fine_tunes(stages):
    stage = stages["tb_student_synth_tb_student_invariant-distinctive2_reweighted_tclr_p20_s0"]
    assert "results/reports/tb_similarity_synth_invariant_distinctive2.parquet" in stage.deps
    assert "results/runs/synth/tb_ft_invariant_p20_s0/model.pt" in stage.deps
    assert "results/runs/synth/tb_ft_distinctive2_p20_s0/model.pt" in stage.deps
    assert "results/runs/synth/tb_ssl_tclr/model.pt" in stage.deps
    pair = stages["tb_similarity_synth_invariant_distinctive2"]
    assert "results/runs/synth/tb_ssl_distinctive2/head.pt" in pair.deps
    assert pair.outs == tuple(tb_similarity_outs("synth", ("invariant", "distinctive2")).values())
    assert stages["tb_similarity_synth"].target and not pair.target
    single = stages["tb_student_synth_tb_student_invariant_tclr_p5_s0"]
    assert tb_similarity_outs("synth")["table"] in single.deps
    assert "--reweight" not in single.cmd


def test_only_the_ssl_runs_some_table_needs_get_a_stage(params):
    def ssl_stages(p):
        return sorted(s.name for s in build_stages(p) if s.name.startswith("tb_ssl_"))

    assert len(ssl_stages(params)) == 7
    raw = params.model_dump()
    for table in ("tb_table4", "tb_table5"):
        raw["tables"][table]["seeds"] = []
    lean = ssl_stages(Params.model_validate(raw))
    assert lean == [f"tb_ssl_synth_{k}" for k in ("distinctive", "invariant", "tclr")]


@pytest.mark.parametrize("name", ["tb_table1", "tb_table4", "tb_table5", "tb_table6"])
def test_each_table_compares_its_rows_with_its_references(params, tmp_path, name):
    rows = [(label, run) for label, run in tb_tables(params)[name] if run.percent in (5, 20)]
    seeds = sorted({run.seed for _, run in rows})
    rows = [(label, TBRun(**{**run.__dict__, "seed": s})) for label, run in rows for s in (0, 1, 2)
            if run.seed == seeds[0]]  # fmt: skip
    run_dirs = {}
    for i, (_, run) in enumerate(dict.fromkeys(rows)):
        run_dirs[run.name] = tmp_path / run.name
        run_dirs[run.name].mkdir(exist_ok=True)
        top1 = 0.2 + 0.05 * (i % 4) + 0.01 * run.seed
        metrics = {"test": {"video_top1": top1, "video_top5": 0.6, "video_map": 0.3},
                   "init_probe": {"top1": 10.0}}  # fmt: skip
        (run_dirs[run.name] / "metrics.json").write_text(json.dumps(metrics))
    table = tb_table(name, rows, run_dirs)
    assert set(table["budget"]) == {5, 20}
    for reference in TB_REFERENCES[name]:
        compared = table[table["row"] != reference]
        assert compared[f"beats_{reference}"].isin(["yes", "no", "within noise"]).all()
        assert (table.loc[table["row"] == reference, f"beats_{reference}"] == "").all()
    assert pd.notna(table["paper_acc@1"]).any()


def test_smaller_budgets_train_as_many_steps_as_the_reference_budget():
    train = {"epochs": 15, "warmup_epochs": 1, "val_every": 1, "lr": 0.05}
    scaled = {**train, "epochs": 60, "warmup_epochs": 4, "val_every": 4}
    assert budget_epochs(train, 5, 20) == scaled
    assert budget_epochs(train, 10, 20)["epochs"] == 30
    assert budget_epochs(train, 20, 20) == budget_epochs(train, 50, 20) == train
    assert budget_epochs(train, 5, None) == train


def test_similarity_figures_draw_any_pair_of_teachers(tmp_path):
    from pipeline.figures import similarity_figures

    table = pd.DataFrame(
        {"label_name": ["Walk", "Walk", "Clap"], "score_invariant": [0.9, 0.8, 0.95],
         "score_invariant2": [0.7, 0.85, 0.9], "s": [0.8, 0.825, 0.925]}
    )  # fmt: skip
    out = tmp_path / "hist.png", tmp_path / "classes.png"
    similarity_figures(table, ["Walk"], *out, title="Inv1 + Inv2")
    assert all(path.stat().st_size > 0 for path in out)
