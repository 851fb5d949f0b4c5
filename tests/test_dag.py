"""One DAG, two front-ends: the Snakefile and dvc.yaml both come from pipeline/dag.py."""

import re
import subprocess
import tomllib

import yaml

from pipeline.config import load_params
from pipeline.dag import build_stages, dvc_yaml
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
    rules = set(re.findall(r"^(?:local)?rule ([\w.]+):", dry, flags=re.M)) - {"all"}
    assert rules == {stage.name for stage in stages}
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        assert stage.command() in dry
        assert dvc[stage.name]["cmd"] == stage.command()


def test_registry_code_dependencies_exist():
    for stage in build_stages(load_params(ROOT / "params.yaml")):
        for path in stage.code:
            assert (ROOT / path).is_file(), f"{stage.name} depends on missing {path}"


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
