"""profiles/slurm: every stage's resources come from the registry and reach the SLURM executor.

`snakemake -n` with the profile runs the executor's dry-run path (no sbatch line is built, but
the profile, the plugin's settings and each job's resources are resolved and printed). The e2e
test runs a tiny target through the real executor against the fake SLURM commands of
tests/fake_slurm (sbatch records each job's flags and runs it here), checks the flags and that
the outputs equal a local run's."""

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.dag import TRAINING, build_stages
from tests.conftest import copy_project
from tests.test_e2e import TINY, edit_params, sh

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


def test_a_multi_node_training_stage_asks_for_nodes_and_runs_its_own_srun(tmp_path):
    project = copy_project(tmp_path / "project")
    edit_params(project, distributed={"processes": 4, "nodes": 2})
    train = planned_resources(project, "results/tables/hpkd_table2.csv")[
        "hpkd_pretrain_synth_full_r2plus1d_s0"
    ]
    assert (train["mpi"], train["nodes"], train["tasks"]) == ("srun", "2", "2")
    assert train["slurm_extra"] == "--gpus-per-node=4 --ntasks-per-node=1"
    assert train["mem_mb"] == str(4 * TRAINING["mem_mb"])  # per node: its 4 processes


FAKE_SLURM = Path(__file__).parent / "fake_slurm"
# A data stage of 2 threads (synth), another (ingest) and a training stage (one GPU), ~1.5 min.
TARGET = "results/runs/synth/baseline_s0/metrics.json"
# The plugin's settings for a fast CI run; logs kept to read what ran inside each job.
FAST = [
    "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
    "--slurm-status-command", "sacct", "--slurm-keep-successful-logs",
]  # fmt: skip
# Outputs that differ between any two runs, on a cluster or not: wall times, and the keys derived
# from the raw videos' mtimes (a shard's `key` attribute; a run's `run_key`, which hashes them).
TIMED = ("data/shards/*/ingest.json", "results/runs/*/history.json", "results/runs/*/dvclive/*")
KEYED = ("data/shards/*/shard-*.h5", "results/runs/*/metrics.json", "results/runs/*/model.pt")


def tiny_project(dest: Path) -> Path:
    copy_project(dest)
    edit_params(dest, **TINY)
    return dest


def run_on_fake_cluster(project: Path, state: Path, target: str) -> list[dict]:
    """`snakemake --workflow-profile profiles/slurm target` with tests/fake_slurm on PATH; the
    sbatch submissions it made, each {"id", "flags", "command"}."""
    state.mkdir()
    path = os.pathsep.join([str(FAKE_SLURM), str(BIN), os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "FAKE_SLURM_DIR": str(state)}
    command = [BIN / "snakemake", "--workflow-profile", "profiles/slurm", *FAST, target]
    try:
        result = subprocess.run(
            command, cwd=project, env=env, capture_output=True, text=True, timeout=600
        )
    finally:  # no job outlives a failed or timed-out run
        log = state / "sbatch.jsonl"
        jobs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        running = [job["id"] for job in jobs if not (state / f"jobs/{job['id']}.exit").exists()]
        if running:
            subprocess.run([FAKE_SLURM / "scancel", *running], env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return jobs


def assert_same_outputs(local: Path, cluster: Path) -> None:
    """Every data and results file of the two runs is byte-identical, but for TIMED (skipped) and
    KEYED (compared without their keys)."""
    files = {
        str(path.relative_to(root))
        for root in (local, cluster)
        for top in ("data", "results")
        for path in (root / top).rglob("*")
        if path.is_file()
    }
    for name in sorted(files):
        a, b = local / name, cluster / name
        assert a.is_file() and b.is_file(), f"{name}: made by one run only"
        if any(fnmatch.fnmatch(name, pattern) for pattern in TIMED):
            continue
        if not any(fnmatch.fnmatch(name, pattern) for pattern in KEYED):
            assert a.read_bytes() == b.read_bytes(), f"{name} differs"
        elif name.endswith(".h5"):
            with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
                assert {**x.attrs, "key": ""} == {**y.attrs, "key": ""}, name
                assert x["index"][()] == y["index"][()], name
                for u, v in zip(x["frames"][()], y["frames"][()], strict=True):
                    assert (u == v).all(), name
        elif name.endswith(".json"):
            x, y = (json.loads(p.read_text()) for p in (a, b))
            assert {**x, "run_key": ""} == {**y, "run_key": ""}, f"{name} differs"
        else:
            x, y = (torch.load(p, weights_only=True) for p in (a, b))
            assert {**x["meta"], "run_key": ""} == {**y["meta"], "run_key": ""}, name
            assert x["model"].keys() == y["model"].keys(), name
            assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"]), name


@pytest.mark.e2e
def test_a_fake_cluster_gets_each_jobs_registry_resources_and_builds_the_same_outputs(tmp_path):
    local = tiny_project(tmp_path / "local")
    sh(BIN / "snakemake", "--cores", "2", TARGET, cwd=local)
    cluster = tiny_project(tmp_path / "cluster")
    jobs = run_on_fake_cluster(cluster, tmp_path / "slurm", TARGET)

    stages = {stage.name: stage for stage in build_stages(load_params(cluster / "params.yaml"))}
    profile = yaml.safe_load((cluster / "profiles/slurm/config.yaml").read_text())
    partition = profile["default-resources"]["slurm_partition"]
    submitted = {job["flags"]["--comment"].removeprefix("rule_"): job for job in jobs}
    assert sorted(submitted) == ["ingest_synth", "synth", "train_synth_baseline_s0"]
    steps = [json.loads(line) for line in (tmp_path / "slurm/srun.jsonl").read_text().splitlines()]
    steps = {step["job"]: step["options"] for step in steps}
    for name, job in submitted.items():
        stage, flags = stages[name], job["flags"]
        assert flags["-p"] == partition, name  # the profile's, set once
        assert flags["--cpus-per-task"] == str(stage.threads), name  # not capped at 1 as in -n
        assert flags["--mem"] == str(stage.mem_mb) and flags["-t"] == str(stage.runtime), name
        assert flags.get("--gpus") == (str(stage.gpu) if stage.gpu else None), name
        # Inside the job: the step asks for the same CPUs and GPUs; the command gets the threads.
        assert f"--cpus-per-task={stage.threads}" in steps[job["id"]], name
        assert (f"--gpus={stage.gpu}" in steps[job["id"]]) == bool(stage.gpu), name
        # (`--cores all` in the job: at most the CPUs it sees, on SLURM its --cpus-per-task)
        threads = min(stage.threads, len(os.sched_getaffinity(0)))
        log = cluster / f".snakemake/slurm_logs/rule_{name}/{job['id']}.log"
        assert f"Shell command: {stage.launched()} --threads {threads}\n" in log.read_text(), name
    assert stages["synth"].threads == 2  # a multi-threaded stage: --cpus-per-task=2, --threads 2
    train = submitted["train_synth_baseline_s0"]["flags"]
    assert train["--gpus"] == str(TRAINING["gpu"]) and train["--mem"] == str(TRAINING["mem_mb"])
    assert train["-t"] == str(TRAINING["runtime"])
    assert json.loads((cluster / TARGET).read_text())["threads"] == int(train["--cpus-per-task"])

    assert_same_outputs(local, cluster)
