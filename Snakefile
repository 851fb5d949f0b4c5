# Rules are built from the stage registry in pipeline/dag.py; dvc.yaml is generated from the same
# registry, so both tools run the same commands on the same inputs and outputs.
import shutil
import sys

sys.path.insert(0, workflow.basedir)

from pipeline.config import load_params
from pipeline.dag import build_stages, caption, is_report_item
from pipeline.errors import ConfigError
from pipeline.handover import accept_dvc_runs, record_for_dvc

try:
    PARAMS = load_params()
except ConfigError as err:
    print(err, file=sys.stderr)
    sys.exit(2)

STAGES = build_stages(PARAMS)
# Stages that can use a GPU claim the `gpu` resource (capped by the profile) only where there is
# one; on a CPU-only machine they run side by side, limited by --cores alone. A cluster profile
# sets `config: {gpus: true}`: its login node has no GPU, its compute nodes do.
USE_GPU = config.get("gpus", shutil.which("nvidia-smi") is not None)
# Stages DVC built since the last Snakemake run are touched (their params recorded), not rerun.
# A hook, like onsuccess: cluster jobs, and the handover's own touch, run with --no-hooks.
if "--no-hooks" not in sys.argv:
    accept_dvc_runs({stage.name for stage in STAGES})


def _files(paths):
    """Outputs as Snakemake declares them: folders as directory(), tables and figures as report()
    items with their captions, so `snakemake --report report.html <target>` gathers them into one
    page."""
    files = []
    for path in paths:
        if path.endswith("/"):
            files.append(directory(path.rstrip("/")))
        elif is_report_item(path):
            category = "Tables" if path.endswith(".csv") else "Figures"
            files.append(report(path, caption=caption(path), category=category))
        else:
            files.append(path)
    return files


rule all:
    input:
        [out.rstrip("/") for stage in STAGES if stage.target for out in stage.outs],


for stage in STAGES:

    rule:
        name:
            stage.name
        input:
            [p.rstrip("/") for p in (*stage.deps, *stage.code)],
        output:
            _files(stage.outs),
        params:
            # Evaluated now; `shell:` is evaluated at run time, when `stage` is the loop's last.
            cmd=stage.launched(),
            values=stage.param_values(PARAMS),
        threads: stage.threads
        conda:
            "envs/pipeline.yaml"
        resources:
            **stage.resources(USE_GPU),
        shell:
            "{params.cmd} --threads {threads}"


onsuccess:
    # The stages this run built (or touched) go into dvc.lock, so `dvc repro` knows them too.
    built = {job.rule.name for job in workflow.dag.needrun_jobs(exclude_finished=False)}
    in_order = [job.rule.name for level in workflow.dag.toposorted() for job in level]
    record_for_dvc([name for name in in_order if name != "all"], built)
