"""One DAG, two front-ends: the Snakefile and dvc.yaml both come from pipeline/dag.py."""

import re
import subprocess
import tomllib

import pytest
import yaml

from pipeline.config import load_params
from pipeline.dag import ALL_TEACHERS, build_stages, caption, dtg_tables, dvc_yaml, is_report_item
from tests.conftest import BIN, ROOT, copy_project, run_cli


def test_committed_dvc_yaml_is_current():
    result = run_cli("dvc-yaml", "--check", cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_check_fails_on_stale_dvc_yaml(tmp_path):
    copy_project(tmp_path)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text().replace("--threads", "-t"))
    result = run_cli("dvc-yaml", "--check", cwd=tmp_path)
    assert result.returncode != 0
    assert "dvc.yaml is stale" in result.stderr
    assert run_cli("dvc-yaml", cwd=tmp_path).returncode == 0
    assert run_cli("dvc-yaml", "--check", cwd=tmp_path).returncode == 0


def test_snakemake_runs_the_registry_commands():
    """Every rule's shell command is the registry's, as DVC runs it."""
    stages = build_stages(load_params(ROOT / "params.yaml"))
    dry = subprocess.run(
        [BIN / "snakemake", "-n", "-p", "--forceall", "--cores", "8", "all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = set(re.findall(r"^(?:local)?rule ([\w.+-]+):", dry, flags=re.M)) - {"all"}
    assert rules == {stage.name for stage in stages}
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        assert stage.command() in dry
        assert dvc[stage.name]["cmd"] == stage.command()


def test_registry_code_dependencies_exist():
    for stage in build_stages(load_params(ROOT / "params.yaml")):
        for path in stage.code:
            assert (ROOT / path).is_file(), f"{stage.name} depends on missing {path}"


def test_every_table_and_figure_has_a_caption_for_the_report():
    items = [
        out
        for stage in build_stages(load_params(ROOT / "params.yaml"))
        for out in stage.outs
        if is_report_item(out)
    ]
    assert len(items) > 50
    for out in items:
        text = (ROOT / caption(out)).read_text()
        assert len(text.split()) >= 10, f"{out}: caption {caption(out)} says too little"
    assert caption("results/figures/tb_similarity_classes_synth.png").endswith("classes.rst")
    with pytest.raises(ValueError, match="no caption"):
        caption("results/figures/new_figure.png")
    captions = {path.name for path in (ROOT / "report").glob("*.rst")}
    assert captions == {caption(out).split("/")[-1] for out in items}  # none unused


def test_dvc_yaml_lists_declared_params_and_outputs():
    stages = build_stages(load_params(ROOT / "params.yaml"))
    dvc = yaml.safe_load(dvc_yaml(stages).split("\n", 1)[1])["stages"]
    for stage in stages:
        assert dvc[stage.name].get("params", []) == list(stage.params)
        assert dvc[stage.name]["outs"] == [p.rstrip("/") for p in stage.outs]


def test_conda_env_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs/pipeline.yaml").read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert sorted(pip) == sorted(project)


def _stages() -> dict:
    return {stage.name: stage for stage in build_stages(load_params(ROOT / "params.yaml"))}


def test_table3_rows_hang_off_teachers_features_and_the_single_teacher_rows():
    params = load_params(ROOT / "params.yaml")
    stages = _stages()
    rows = dtg_tables(params)["table3"]
    seeds = params.tables.table3.seeds
    assert len(rows) == 11 * len(seeds)  # Scratch + DTG-Net's ten rows
    table = stages["table3"]
    probes = [f"results/runs/synth/probe_{t}/metrics.json" for t in ALL_TEACHERS]
    assert len(table.deps) == len(rows) + 4 and all(p in table.deps for p in probes)
    assert stages["probe_synth_bu101"].deps == ("data/shards/synth/", "data/features/synth/bu101/")
    for label, run in rows:
        finetune = stages[f"finetune_synth_{run.name}"]
        assert f"results/runs/synth/{run.name}/metrics.json" in table.deps
        if label == "Scratch":
            assert run.pretrained is None
            continue
        pretrain = stages[f"pretrain_synth_{run.pretrained.name}"]
        assert f"results/runs/synth/{run.pretrained.name}/model.pt" in finetune.deps
        for teacher in run.pretrained.teachers:
            assert f"data/features/synth/{teacher}/" in pretrain.deps
            assert stages[f"features_synth_{teacher}"].deps[1] == (
                f"results/teachers/{teacher}/model.pt"
            )
        if label == "All offline":
            singles = [d for d in pretrain.deps if d.endswith("metrics.json")]
            assert len(singles) == 4
            assert all(
                "_single_" in d and d.endswith(f"_s{run.seed}/metrics.json") for d in singles
            )
            assert "dtg.offline_from" in pretrain.params
        if label.startswith("All online"):
            assert any(out.endswith("_weights.png") for out in pretrain.outs)


def test_every_dtg_table_run_is_a_stage_and_names_are_unique():
    params = load_params(ROOT / "params.yaml")
    stages = _stages()
    for table, rows in dtg_tables(params).items():
        assert table in stages and stages[table].target
        for _, run in rows:
            assert f"finetune_synth_{run.name}" in stages
    for label, run in dtg_tables(params)["table4"]:
        stage = stages[f"finetune_synth_{run.name}"]
        guided = label == "Supervised DTG"
        assert ("dtg.alpha" in stage.params) == guided
        assert any(d.startswith("data/features/") for d in stage.deps) == guided
    for label, run in dtg_tables(params)["table1"]:
        if label == "BU-teacher init":
            deps = stages[f"finetune_synth_{run.name}"].deps
            assert "results/teachers/bu101/model.pt" in deps


def test_the_second_world_is_generated_ingested_and_reported_by_its_own_stages():
    stages = {stage.name: stage for stage in build_stages(load_params(ROOT / "params.yaml"))}
    world, ingest = stages["synth_hmdb"], stages["ingest_synth_hmdb"]
    assert set(ingest.deps) == {"data/raw/synth_hmdb/videos/", "data/raw/synth_hmdb/splits/"}
    assert set(ingest.deps) < set(world.outs)  # ingested from what its stage wrote
    assert world.params == ("synth_hmdb", "datasets.synth_hmdb")
    assert stages["data_report_synth_hmdb"].target  # part of `snakemake all`
