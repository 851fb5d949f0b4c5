"""profiles/slurm: every stage's resources come from the registry and reach the SLURM executor.

`snakemake -n` with the profile runs the executor's dry-run path (no sbatch line is built, but
the profile, the plugin's settings and each job's resources are resolved and printed); the
fake-cluster run of the scale-out issue is still to come."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dag import TRAINING
from tests.conftest import copy_project

pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
BIN = Path(sys.executable).parent


def planned_resources(project: Path, target: str) -> dict[str, dict[str, str]]:
    result = subprocess.run(
        [BIN / "snakemake", "-n", "--workflow-profile", "profiles/slurm", target],
        cwd=project, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    jobs, rule = {}, None
    for line in result.stdout.splitlines():
        if match := re.match(r"rule (\S+):$", line):
            rule = match.group(1)
        elif rule and line.strip().startswith("resources: "):
            values = line.strip().removeprefix("resources: ")
            jobs[rule] = dict(v.split("=", 1) for v in values.split(", "))
    return jobs


def test_training_stages_ask_the_cluster_for_a_gpu_memory_and_time(tmp_path):
    project = copy_project(tmp_path / "project")
    jobs = planned_resources(project, "results/tables/hpkd_table2.csv")
    train = jobs["hpkd_pretrain_synth_full_r2plus1d_s0"]
    assert train["gpu"] == str(TRAINING["gpu"])  # asked for although this machine has none
    assert train["mem_mb"] == str(TRAINING["mem_mb"])
    assert train["runtime"] == str(TRAINING["runtime"])
    assert train["slurm_partition"] == "gpu"  # the profile's, set once
    data = jobs["ingest_synth"]
    assert data["gpu"] == "0" and int(data["mem_mb"]) < TRAINING["mem_mb"]
