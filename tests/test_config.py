"""params.yaml validation: one line naming the dotted key, exit code 2, before any work."""

import pytest
import yaml

from pipeline.config import DeclaredParams, lookup, validate_params
from pipeline.errors import ConfigError
from tests.conftest import run_cli


def test_committed_params_are_valid(project_params):
    params = validate_params(project_params)
    assert params.dataset in params.datasets


@pytest.mark.parametrize(
    "edit, key, problem",
    [
        (lambda p: p["ingest"].update(codec="png"), "ingest.codec", "'jpeg' or 'raw'"),
        (lambda p: p["ingest"].update(num_shards=0), "ingest.num_shards", "greater than or equal"),
        (lambda p: p["ingest"].update(short_side="big"), "ingest.short_side", "integer"),
        (lambda p: p["ingest"].update(colour="rgb"), "ingest.colour", "unknown key"),
        (lambda p: p.update(datset="synth"), "datset", "unknown key"),
        (lambda p: p["datasets"]["ucf101"].update(split=4), "datasets.ucf101.split", "less than"),
        (lambda p: p.update(dataset="kinetics"), "<root>", "not a key of datasets"),
        (lambda p: p["ingest"].update(percents=[5, 10]), "<root>", "dtg.labeled_percent 20"),
        (lambda p: p["ingest"].update(percents=[1, 20]), "<root>", "tables.tb_table1.percents 5"),
        (lambda p: p["timebalance"]["ssl"].update(augmentations=1), "timebalance.ssl", "L_D1"),
    ],
)
def test_bad_value_names_the_dotted_key(project_params, edit, key, problem):
    edit(project_params)
    with pytest.raises(ConfigError) as err:
        validate_params(project_params)
    message = str(err.value)
    assert f"params: {key}:" in message
    assert problem in message
    assert "\n" not in message


def test_stage_command_exits_2_before_any_work(tmp_path, project_params):
    project_params["ingest"]["codec"] = "png"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_params))
    result = run_cli("ingest", "--dataset", "synth", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "params: ingest.codec: Input should be 'jpeg' or 'raw'"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_missing_params_file_exits_2(tmp_path):
    result = run_cli("synth", cwd=tmp_path)
    assert result.returncode == 2
    assert "params.yaml not found" in result.stderr


def test_declared_view_refuses_undeclared_keys(project_params):
    params = validate_params(project_params)
    view = DeclaredParams(params, ("ingest", "datasets.synth"))
    assert view.ingest.codec == params.ingest.codec
    assert view.datasets.synth.raw == params.datasets["synth"].raw
    assert view.datasets["synth"].format == "ucf101"
    with pytest.raises(ConfigError, match="'synth' but does not declare"):
        _ = view.synth
    with pytest.raises(ConfigError, match="'datasets.ucf101'"):
        _ = view.datasets.ucf101


def test_lookup_dotted(project_params):
    params = validate_params(project_params)
    assert lookup(params, "ingest.codec") == params.ingest.codec
    with pytest.raises(ConfigError, match="ingest.nope: no such key"):
        lookup(params, "ingest.nope")


def test_synth_section_mirrors_the_world_spec():
    """params.yaml's synth section and WorldSpec have the same fields and defaults."""
    import dataclasses

    from pipeline.config import SynthParams
    from pipeline.data.synth import WorldSpec

    spec = {f.name: f.default for f in dataclasses.fields(WorldSpec)}
    mirror = SynthParams().model_dump()
    assert set(mirror) == set(spec)
    differing = {
        k: (mirror[k], spec[k]) for k in spec if mirror[k] is not None and mirror[k] != spec[k]
    }
    assert differing == {}


def test_a_float_written_without_a_dot_reads_as_dvc_reads_it(tmp_path, project_params):
    text = yaml.safe_dump(project_params).replace("lr: 0.05\n", "lr: 5e-2\n", 1)
    assert "lr: 5e-2" in text
    (tmp_path / "params.yaml").write_text(text)
    from pipeline.config import load_params

    assert load_params(tmp_path / "params.yaml").train.lr == 0.05
