"""End-to-end runs of the real DAG on a tiny synthetic world, through Snakemake and through DVC."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import BIN, copy_project

pytestmark = pytest.mark.e2e

TINY = {
    "synth": {
        "groups_per_class": 4,
        "clips_per_group": 2,
        "test_groups": 2,
        "objects_train_per_class": 4,
        "objects_val_per_class": 2,
        "scenes_train_per_class": 4,
        "scenes_val_per_class": 2,
        "bu101_per_class": 2,
        "stanford40_train_per_class": 2,
        "stanford40_test_per_class": 2,
        "parsing_train": 4,
        "parsing_val": 2,
    },
    "synth_hmdb": {"groups_per_class": 4, "clips_per_group": 2, "test_groups": 1},
    "ingest": {"num_shards": 2},
    "train": {"epochs": 2, "batch_size": 8},
    "clips": {"test_clips": 2},
    "teachers": {
        name: {"source": "synthetic", "epochs": 1, "batch_size": 8}
        for name in ("imagenet", "places", "bu101", "stanford40", "schp")
    },
    "dtg": {
        "queue_size": 16,  # fewer than the tiny world's 48 pretraining videos
        "labeled_percent": 50,
        "pretrain": {"epochs": 2, "batch_size": 8},
        "finetune": {"epochs": 2, "batch_size": 4},
    },
    "timebalance": {
        "ssl": {"head_hidden": 32, "pretrain": {"epochs": 1, "batch_size": 8}},
        "finetune": {"epochs": 2, "batch_size": 4},
        "student": {"train": {"epochs": 2, "batch_size": 4}},
    },
    "hpkd": {
        "labeled_percent": 50,
        "pretrain": {"queue_size": 16, "train": {"epochs": 1, "batch_size": 8}},
        "finetune": {"epochs": 2, "batch_size": 4},
    },
    "tables": {
        "selfkd_table3": {"seeds": [0]},
        "selfkd_table8": {"taus": [5.0, 10.0], "lambdas": [0.2], "seeds": [0]},
        "table3": {"seeds": [0]},
        "tb_table2": {"seeds": [0], "percents": [50]},
        "tb_table3": {"seeds": [0], "percents": [50]},
        "hpkd_table2": {"seeds": [0], "backbones": ["r2plus1d"]},
    },
}


# Snakemake without the handover to DVC (--no-hooks): for the tests where DVC must then build
# the same outputs itself rather than restore Snakemake's from its cache.
SNAKEMAKE_ONLY = ("snakemake", "--no-hooks", "--cores", "2")


def sh(*cmd, cwd: Path, check: bool = True, timeout: int = 900) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def edit_params(project: Path, **sections) -> None:
    """Merge `sections` into the project's params.yaml, nested mappings key by key."""

    def merge(into: dict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    merge(params, sections)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path) -> Path:
    """A git + DVC repository holding the project with the tiny world's params."""
    copy_project(dest)
    edit_params(dest, **TINY)
    sh(sys.executable, "-m", "pipeline", "dvc-yaml", cwd=dest)
    sh("git", "init", "-q", cwd=dest)
    sh("dvc", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny", cwd=dest)
    return dest


@pytest.fixture(scope="module")
def data_project(tmp_path_factory) -> Path:
    """The tiny project after Snakemake ran its data stages (recorded for DVC by its onsuccess)."""
    project = make_project(tmp_path_factory.mktemp("data") / "project")
    reports = ("results/reports/data_synth.txt", "results/reports/data_synth_hmdb.txt")
    sh("snakemake", "--cores", "2", *reports, cwd=project)
    return project  # the Snakefile's onsuccess recorded the data stages for DVC


def snakemake_plan(project: Path, target: str) -> set[str]:
    out = sh("snakemake", "-n", "--cores", "2", target, cwd=project)
    return set(re.findall(r"^(?:local)?rule ([\w.+-]+):", out, flags=re.M))


def dvc_plan(project: Path, target: str, dry: bool = True) -> set[str]:
    """Stages `dvc repro` runs (or, dry, would run knowing only the changes made so far)."""
    out = sh("dvc", "repro", *(["--dry"] if dry else []), target, cwd=project)
    return set(re.findall(r"Running stage '([\w.]+)'", out))


def dvc_changed(project: Path, *stages: str) -> set[str]:
    stages = stages or ("synth", "ingest_synth", "data_report_synth")
    out = sh("dvc", "status", "--json", *stages, cwd=project)
    return set(json.loads(out[out.index("{") :]))


def test_up_to_date_data_stages_do_nothing_in_both_tools(data_project):
    assert snakemake_plan(data_project, "results/reports/data_synth.txt") == set()
    assert dvc_plan(data_project, "data_report_synth") == set()
    assert dvc_changed(data_project) == set()
    report = (data_project / "results/reports/data_synth.txt").read_text()
    assert "96 in 2 shards" in report
    # The second world, in HMDB51's layout, through the HMDB51 reader: 8 classes x 4 x 2 clips.
    assert snakemake_plan(data_project, "results/reports/data_synth_hmdb.txt") == set()
    assert dvc_plan(data_project, "data_report_synth_hmdb") == set()
    report = (data_project / "results/reports/data_synth_hmdb.txt").read_text()
    assert "64 in 2 shards" in report and "classes       8:" in report
    [split1] = [line for line in report.splitlines() if line.strip().startswith("split1")]
    assert {"train 32", "test 16", "unused 16"} == set(split1.split(None, 1)[1].split(", "))


@pytest.mark.parametrize(
    "section, change, changed",
    [
        ("ingest", {"num_shards": 3}, "ingest_synth"),
        ("synth", {"noise_std": 4.0}, "synth"),
    ],
)
def test_a_params_change_reruns_that_stage_and_downstream(
    data_project, tmp_path, section, change, changed
):
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    edit_params(project, **{section: change})
    stages = ["synth", "ingest_synth", "data_report_synth"]
    expected = set(stages[stages.index(changed) :])
    assert snakemake_plan(project, "results/reports/data_synth.txt") == expected
    # DVC compares contents: `dvc status` names the stage whose declared params changed, and
    # `dvc repro` then also runs what its new outputs invalidate.
    assert dvc_changed(project) == {changed}
    assert dvc_plan(project, "data_report_synth", dry=False) == expected


def test_each_tool_knows_what_the_other_built(data_project, tmp_path):
    """Snakemake's runs reach dvc.lock (its onsuccess commits them), DVC's runs reach Snakemake's
    records (touched before its next run): neither plans the other's work again, and a params
    change after either still reruns the stage in both."""
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    target, stage = "results/runs/synth/baseline_s0/metrics.json", "train_synth_baseline_s0"
    lr = yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"]
    sh("snakemake", "--cores", "2", target, cwd=project)
    start = time.monotonic()
    assert dvc_plan(project, stage, dry=False) == set()
    dvc_noop = time.monotonic() - start

    edit_params(project, train={"lr": lr / 2})
    assert dvc_plan(project, stage, dry=False) == {stage}
    start = time.monotonic()
    assert snakemake_plan(project, target) == set()  # accepts DVC's run: touch, record
    accepting = time.monotonic() - start
    start = time.monotonic()
    assert snakemake_plan(project, target) == set()
    snakemake_noop = time.monotonic() - start
    edit_params(project, train={"lr": lr})  # Snakemake recorded DVC's lr: this is a change
    assert snakemake_plan(project, target) == {stage}
    assert dvc_changed(project, stage) == {stage}
    print(f"no-op after the other tool: dvc repro {dvc_noop:.1f} s, snakemake -n "
          f"{accepting:.1f} s accepting DVC's run, {snakemake_noop:.1f} s after")  # fmt: skip


def test_a_run_shared_through_a_dvc_remote_restores_without_running(data_project, tmp_path):
    """Snakemake builds, DVC pushes to a remote (a local folder here, S3 on a cluster); a fresh
    clone's `dvc repro --pull` restores the run without training, and Snakemake accepts it."""
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    target, stage = "results/runs/synth/baseline_s0/metrics.json", "train_synth_baseline_s0"
    sh("snakemake", "--cores", "2", target, cwd=project)
    sh("dvc", "remote", "add", "--default", "store", tmp_path / "store", cwd=project)
    sh("dvc", "push", "--run-cache", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "built", cwd=project)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", project, clone, cwd=tmp_path)
    out = sh("dvc", "repro", "--pull", stage, cwd=clone)
    assert "Running stage" not in out, out
    assert (clone / target).read_bytes() == (project / target).read_bytes()
    assert snakemake_plan(clone, target) == set()  # accepted as DVC's: no --touch needed
    assert dvc_plan(clone, stage) == set()


def test_a_training_stage_on_two_processes_trains_as_one_process(data_project, tmp_path):
    """distributed.processes: 2 makes the stage a torchrun of 2 gloo processes sharing the
    global batch: losses and trained weights equal the 1-process run's up to float rounding
    (amplified by training: 1 thread against 2 already moves the weights by about 3e-4 of their
    norm; without synchronised batch norm they move by 3e-2, which this test catches)."""
    run = "results/runs/synth/baseline_s0/"
    runs = {}
    for processes in (1, 2):
        project = tmp_path / f"processes{processes}"
        shutil.copytree(data_project, project, symlinks=True)
        edit_params(project, distributed={"processes": processes})
        out = sh("snakemake", "--cores", "2", f"{run}metrics.json", cwd=project)
        assert ("torch.distributed.run --nproc-per-node 2" in out) == (processes == 2)
        runs[processes] = project / run
    one, two = (json.loads((runs[n] / "metrics.json").read_text()) for n in (1, 2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["batch_size"] * 2 == two["global_batch_size"] == one["global_batch_size"]
    losses = [[r["train_loss"] for r in json.loads((runs[n] / "history.json").read_text())]
              for n in (1, 2)]  # fmt: skip
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-6)  # the same batches and steps
    assert losses[1][-1] == pytest.approx(losses[0][-1], rel=1e-4)
    weights = [
        torch.cat([v.flatten().double() for _, v in sorted(model.items()) if v.is_floating_point()])
        for model in (torch.load(runs[n] / "model.pt", weights_only=True)["model"] for n in (1, 2))
    ]
    assert (weights[1] - weights[0]).norm() < 3e-3 * weights[0].norm()


def check_table3(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    assert list(table["method"]) == [
        "Baseline", "Baseline + Data Aug", "Teaching Yourself", "Teaching Yourself (tau^2)"
    ]  # fmt: skip
    for column in ("clip@1_mean", "video@1_mean"):
        values = table[column].to_numpy()
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in values), column
    assert table[["clip@1_std", "video@1_std"]].isna().all().all()  # one seed: no spread claimed
    return table


def test_table_through_snakemake_then_dvc_agree(data_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    sh(*SNAKEMAKE_ONLY, "results/tables/selfkd_table3.csv", cwd=project)
    by_snakemake = check_table3(project / "results/tables/selfkd_table3.csv")
    assert (project / "results/figures/selfkd_table3.png").stat().st_size > 1000
    assert snakemake_plan(project, "results/tables/selfkd_table3.csv") == set()

    for run in project.glob("results/runs/synth/*/"):
        shutil.rmtree(run)
    (project / "results/tables/selfkd_table3.csv").unlink()
    out = sh("dvc", "repro", "selfkd_table3", cwd=project)
    assert "Running stage 'selfkd_table3'" in out
    by_dvc = check_table3(project / "results/tables/selfkd_table3.csv")
    pd.testing.assert_frame_equal(by_snakemake, by_dvc)
    assert "up to date" in sh("dvc", "repro", "selfkd_table3", cwd=project)


def test_train_stage_killed_mid_run_resumes_to_the_same_metrics(data_project, tmp_path):
    """SIGKILL during training, start again: it resumes from the last completed epoch and ends
    with metrics equal to an uninterrupted run's."""
    args = ["-m", "pipeline", "train", "--dataset", "synth", "--method", "supervised"]
    args += ["--seed", "0", "--threads", "1"]
    runs = {}
    for name in ("killed", "straight"):
        project = tmp_path / name
        shutil.copytree(data_project, project, symlinks=True)
        edit_params(project, train={"epochs": 6})
        runs[name] = project
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run_dir = runs["killed"] / "results/runs/synth/baseline_s0"
    proc = subprocess.Popen([sys.executable, *args], cwd=runs["killed"], env=env)
    history = run_dir / "history.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and len(json.loads(history.read_text())) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    completed = len(json.loads(history.read_text()))
    assert 2 <= completed < 6 and not (run_dir / "metrics.json").exists()

    resumed = sh(sys.executable, *args, cwd=runs["killed"])
    # history.json is written just after the checkpoint: the kill may fall between the two.
    resumed_after = int(re.search(r"resuming after epoch (\d+)", resumed).group(1))
    assert resumed_after in (completed - 1, completed)
    sh(sys.executable, *args, cwd=runs["straight"])
    straight = runs["straight"] / "results/runs/synth/baseline_s0/metrics.json"
    assert (run_dir / "metrics.json").read_text() == straight.read_text()
    summary = sh(sys.executable, "-m", "pipeline", "inspect", run_dir, cwd=runs["killed"])
    assert "test video" in summary and not (run_dir / "checkpoints").exists()


def check_dtg_table3(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    assert list(table["row"]) == [
        "Scratch", "ImageNet", "Places", "BU", "Stanford", "ImageNet+Places", "BU+Stanford",
        "All", "All offline", "All online1", "All online2", "Teacher probe: ImageNet",
        "Teacher probe: Places", "Teacher probe: BU", "Teacher probe: Stanford",
    ]  # fmt: skip
    assert table["probe@1_mean"].between(0, 100).all()
    students = table[~table["row"].str.startswith("Teacher probe")]
    for column in ("acc@1_mean", "acc@5_mean"):
        assert students[column].between(0, 100).all(), students[column]
    assert table["acc@1_std"].isna().all()  # one seed: no spread is claimed
    assert (students["acc@5_mean"] >= students["acc@1_mean"]).all()
    assert (students["DataSize"] > 0).sum() == 10 and table.loc[0, "DataSize"] == 0
    assert students["transfer"].iloc[1:].gt(0).all() and math.isnan(students["transfer"].iloc[0])
    offline = table.set_index("row").loc["All offline", "weights"]
    weights = [float(part.split()[1]) for part in offline.split(", ")]
    assert len(weights) == 4 and math.isclose(sum(weights), 1.0, abs_tol=0.01)
    assert set(table["beats_Scratch"].dropna()) <= {"yes", "no", "within noise", "one seed"}
    return table


def test_dtg_table3_through_snakemake_then_dvc_agree(data_project, tmp_path):
    """The main job on the tiny world: teachers, features, 10 pretrainings, 11 fine-tunes."""
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    target = "results/tables/table3.csv"
    sh(*SNAKEMAKE_ONLY, target, cwd=project)
    by_snakemake = check_dtg_table3(project / target)
    assert (project / "results/figures/table3.png").stat().st_size > 1000
    assert list(project.glob("results/figures/dtg_all_online1_*_weights.png"))
    started = time.monotonic()
    assert snakemake_plan(project, target) == set()
    assert time.monotonic() - started < 10
    sh("snakemake", "--report", "report.html", target, cwd=project)
    report = (project / "report.html").read_text(errors="replace")
    assert "table3.csv" in report and "table3.png" in report

    for folder in ("results/runs", "results/teachers", "data/features"):
        shutil.rmtree(project / folder)
    (project / target).unlink()
    out = sh("dvc", "repro", "table3", cwd=project)
    assert "Running stage 'table3'" in out
    pd.testing.assert_frame_equal(by_snakemake, check_dtg_table3(project / target))
    started = time.monotonic()
    assert "up to date" in sh("dvc", "repro", "table3", cwd=project)
    assert time.monotonic() - started < 10


def test_timebalance_table2_through_snakemake_then_dvc_agree(data_project, tmp_path):
    """Three SSL runs, the score s, 3 fine-tunes and 4 students, in either tool, alike."""
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    target = "results/tables/tb_table2.csv"
    sh(*SNAKEMAKE_ONLY, target, cwd=project)
    by_snakemake = pd.read_csv(project / target)
    assert list(by_snakemake["row"]) == [
        "f_S", "f_I", "f_D", "S+I", "S+D", "S+I+D averaged", "S+I+D reweighted"
    ]  # fmt: skip
    assert by_snakemake["acc@1_mean"].between(0, 100).all()
    assert set(by_snakemake["beats_f_S"].dropna()) <= {"", "one seed"}
    scores = pd.read_parquet(project / "results/reports/tb_similarity_synth.parquet")
    manifest = pd.read_parquet(project / "data/shards/synth/manifest.parquet")
    assert list(scores["video_id"]) == list(manifest["video_id"])
    assert scores["s"].between(-1, 1).all()
    report = json.loads((project / "results/reports/tb_similarity_synth.json").read_text())
    assert report["motion_only"]["classes"] == ["SitDown", "StandUp", "WalkLeft", "WalkRight"]
    for figure in ("tb_similarity_synth.png", "tb_similarity_classes_synth.png", "tb_table2.png"):
        assert (project / "results/figures" / figure).stat().st_size > 1000
    assert snakemake_plan(project, target) == set()

    shutil.rmtree(project / "results/runs")
    (project / target).unlink()
    out = sh("dvc", "repro", "tb_table2", cwd=project)
    assert "Running stage 'tb_ssl_synth_tclr'" in out
    pd.testing.assert_frame_equal(by_snakemake, pd.read_csv(project / target))


def test_hpkd_table2_through_snakemake_then_dvc_agree(data_project, tmp_path):
    """The parsing teacher and its cache, three pre-trainings and their fine-tunes, alike."""
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    target = "results/tables/hpkd_table2.csv"
    sh(*SNAKEMAKE_ONLY, target, cwd=project)
    by_snakemake = pd.read_csv(project / target)
    assert list(by_snakemake["row"]) == ["w/o KD", "TI", "Full"]
    assert by_snakemake["acc@1_mean"].between(0, 100).all()
    assert set(by_snakemake["beats_w/o KD"].dropna()) <= {"", "one seed"}
    runs = project / "results/runs/synth"
    for variant in ("ti", "full"):
        metrics = json.loads((runs / f"hpkd_pre_{variant}_r2plus1d_s0/metrics.json").read_text())
        assert 0 <= metrics["test_parts"]["argmax_agreement"] <= 1
        assert (runs / f"hpkd_pre_{variant}_r2plus1d_s0/parts.png").stat().st_size > 1000
    assert not (runs / "hpkd_pre_rsp_r2plus1d_s0/parts.png").exists()
    assert snakemake_plan(project, target) == set()

    shutil.rmtree(project / "results/runs")
    (project / target).unlink()
    out = sh("dvc", "repro", "hpkd_table2", cwd=project)
    assert "Running stage 'hpkd_pretrain_synth_full_r2plus1d_s0'" in out
    pd.testing.assert_frame_equal(by_snakemake, pd.read_csv(project / target))


def test_a_failed_ingest_keeps_its_finished_shards_for_both_tools(data_project, tmp_path):
    """Both tools delete a failed job's outputs; the shards it finished are in the partial
    folder beside them, and the next run of either tool keeps them instead of decoding again."""
    project = tmp_path / "project"
    shutil.copytree(data_project, project, symlinks=True)
    stray = project / "data/raw/synth/videos/Clap/v_Clap_g99_c01.mp4"
    stray.write_bytes(b"")  # on disk but in no split: a rejection, which strict makes fatal
    sh("dvc", "commit", "-f", "synth", cwd=project)  # the world as it now is: no synth rerun
    partial = project / "data/shards/.synth.partial"
    for tool, shards, run in (
        ("snakemake", 3, ("snakemake", "--cores", "2", "ingest_synth")),
        ("dvc", 2, ("dvc", "repro", "ingest_synth")),
    ):
        edit_params(project, ingest={"strict": True, "num_shards": shards})  # every shard anew
        out = sh(*run, cwd=project, check=False)
        assert "strict ingest: 1 inputs rejected" in out and "in no split" in out, (tool, out)
        assert not (project / "data/shards/synth/manifest.parquet").exists(), tool
        assert len(list(partial.glob("shard-*.h5"))) == shards, tool
        edit_params(project, ingest={"strict": False})
        out = sh(*run, cwd=project)
        assert f"keeping {shards} finished shards of {shards}" in out, (tool, out)
        manifest = pd.read_parquet(project / "data/shards/synth/manifest.parquet")
        assert manifest["shard"].nunique() == shards and not partial.exists(), tool
