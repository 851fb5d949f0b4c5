"""pipeline/handover.py: which stages each tool hands the other, with a fake `dvc` on PATH (the
end-to-end runs in tests/test_e2e.py use the real one)."""

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from pipeline import handover

FAKE_DVC = """#!/bin/sh
echo "$@" >> calls.txt
if [ "$1" = status ]; then echo '{"stale": [{"changed outs": {}}]}'; fi
"""


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A folder with .dvc, a dvc.lock knowing stage `a`, and a fake `dvc` logging its calls."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "bin").mkdir()
    dvc = tmp_path / "bin/dvc"
    dvc.write_text(FAKE_DVC)
    dvc.chmod(dvc.stat().st_mode | stat.S_IEXEC)
    lock = {"schema": "2.0", "stages": {"a": {"cmd": "x"}, "stale": {"cmd": "y"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def calls(repo: Path) -> list[list[str]]:
    path = repo / "calls.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_snakemake_records_what_it_built_and_what_dvc_lacks_in_the_order_it_ran(repo):
    handover.record_for_dvc(["a", "c", "b", "stale"], built={"b", "stale"})
    # `a` is known and was not built; `c` is unknown to DVC; `c` ran before `b`.
    assert calls(repo) == [["commit", "--force", "c", "b", "stale"]]
    assert (repo / handover.SEEN_LOCK).read_text() == (repo / "dvc.lock").read_text()


def test_only_a_changed_dvc_lock_makes_snakemake_ask_dvc(repo):
    handover.record_for_dvc([], built=set())  # Snakemake has now seen dvc.lock
    handover.accept_dvc_runs({"a", "stale"})
    assert calls(repo) == []  # one file comparison, no dvc call
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"] |= {"a": {"cmd": "new"}, "stale": {"cmd": "new"}, "gone": {"cmd": "z"}}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert handover.stages_built_by_dvc({"a", "stale"}, "dvc") == ["a"]  # `stale`: DVC disowns it
    assert calls(repo) == [["status", "--json", "a", "stale"]]  # `gone`: not a Snakemake rule


def test_outside_a_dvc_repository_nothing_is_handed_over(repo):
    (repo / ".dvc").rmdir()
    handover.record_for_dvc(["a", "c"], built={"c"})
    handover.accept_dvc_runs({"a", "c"})
    assert calls(repo) == [] and not (repo / handover.SEEN_LOCK).exists()


def test_dvc_status_json_after_warnings_is_read(repo):
    stale = json.dumps({"b": []})
    (repo / "bin/dvc").write_text(f"#!/bin/sh\necho 'WARNING: x'\necho '{stale}'\n")
    assert handover.stages_built_by_dvc({"a", "b"}, "dvc") == ["a"]
