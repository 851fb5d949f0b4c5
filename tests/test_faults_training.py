"""What goes wrong around training runs, and what the user sees: one line naming the file or
key, and nothing good lost (the data side is tests/test_faults.py)."""

import json
import subprocess
import sys
import time

import pytest
import torch
import yaml

from pipeline.cli import run_identity
from pipeline.dag import RunSpec, Stage
from pipeline.errors import DataError
from pipeline.finetune import load_init
from pipeline.locks import hold, lock_path
from pipeline.models import build_video_model
from pipeline.train import load_checkpoint, save_checkpoint
from tests.conftest import ROOT, run_cli


def _summary(key: str) -> dict:
    """A feature cache's cache.json (pipeline.teachers.features.read_summary's keys)."""
    return {"key": key, "checkpoint_sha256": "", "feature_dim": 4, "num_parts": 0,
            "parts_size": 8, "shards": []}  # fmt: skip


def _stage(tmp_path) -> Stage:
    code = tmp_path / "method.py"
    code.write_text("LOSS = 1\n")
    init = tmp_path / "init.pt"
    init.write_bytes(b"weights v1")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.json").write_text(json.dumps(_summary("cache-v1")))
    return Stage(name="s", cmd="c", outs=("out/",), deps=(str(init), str(cache) + "/"),
                 params=("dataset",), code=(str(code),))  # fmt: skip


def test_a_run_is_keyed_by_its_code_and_inputs_not_only_its_params(tmp_path):
    from pipeline.config import load_params

    params = load_params(ROOT / "params.yaml")
    stage = _stage(tmp_path)
    first = run_identity(stage, params)
    assert run_identity(stage, params) == first
    changes = {
        "code": lambda: (tmp_path / "method.py").write_text("LOSS = 2\n"),
        "init checkpoint": lambda: (tmp_path / "init.pt").write_bytes(b"weights v2"),
        "rebuilt cache": lambda: (tmp_path / "cache" / "cache.json").write_text(
            json.dumps(_summary("cache-v2"))
        ),
    }
    seen = [first]
    for what, change in changes.items():
        change()
        now = run_identity(stage, params)
        assert now not in seen, what
        seen.append(now)


def test_an_ad_hoc_run_from_a_checkpoint_never_writes_into_a_tables_run():
    table_run = RunSpec("supervised", 0, augment=False)
    ad_hoc = RunSpec("supervised", 0, augment=False, init="0123456789ab")
    assert table_run.name == "baseline_s0"
    assert ad_hoc.name == "baseline_s0_init-0123456789ab"


@pytest.fixture
def project(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return tmp_path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.pt", "no such checkpoint file"),
    (lambda p: (p / "folder").mkdir() or p / "folder", "is a folder"),
])  # fmt: skip
def test_train_init_names_a_bad_path_in_one_line(project, make, message):
    result = run_cli("train", "--dataset", "synth", "--method", "supervised", "--seed", "0",
                     "--init", make(project), cwd=project)  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (project / "results").exists()  # nothing written, no table run touched


@pytest.mark.parametrize("content, message", [
    (b"just some text\n", "not a torch checkpoint"),
    (bytes(range(256)) * 8, "not a torch checkpoint"),
])  # fmt: skip
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_checkpoint(path)
    with pytest.raises(DataError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_a_teacher_checkpoint_given_as_init_says_which_flag_to_use(tmp_path):
    path = tmp_path / "teacher.pt"
    save_checkpoint({"format": "pipeline-teacher/1", "state_dict": {}}, path)
    network = build_video_model("r3d_18", num_classes=3, width=4, layers=[1, 1, 1, 1])
    with pytest.raises(DataError, match="teacher checkpoint: use --init-teacher"):
        load_init(network, path)
    save_checkpoint({"model": network.state_dict()}, tmp_path / "run.pt")
    load_init(network, tmp_path / "run.pt")  # a run's model.pt loads


HOLDER = """
import sys, time
from pipeline.locks import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_on_the_same_run_stops_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "runs" / "baseline_s0"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(DataError) as err, hold(run_dir):
            pass
        assert time.monotonic() - started < 1
        assert f"process {holder.pid}" in str(err.value) and "in use" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    with hold(run_dir):  # the killed holder's lock went with it
        assert lock_path(run_dir).exists() and not run_dir.exists()


def test_without_the_synthetic_dataset_a_synthetic_teacher_is_a_config_error(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["datasets"]["synth"]
    params["dataset"] = "ucf101"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("ingest", "--dataset", "ucf101", cwd=project)
    assert result.returncode == 2
    assert "datasets.synth is missing" in result.stderr and "Traceback" not in result.stderr


def test_load_init_keeps_working_with_torch_weights(tmp_path):
    network = build_video_model("r3d_18", num_classes=3, width=4, layers=[1, 1, 1, 1])
    save_checkpoint({"model": network.state_dict(), "meta": {}}, tmp_path / "m.pt")
    other = build_video_model("r3d_18", num_classes=5, width=4, layers=[1, 1, 1, 1])
    load_init(other, tmp_path / "m.pt")  # another classifier size stays fresh
    assert torch.equal(other.stem[0].weight, network.stem[0].weight)
