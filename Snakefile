# Rules are built from the stage registry in pipeline/dag.py; dvc.yaml is generated from the same
# registry, so both tools run the same commands on the same inputs and outputs.
import shutil
import sys

sys.path.insert(0, workflow.basedir)

from pipeline.config import load_params
from pipeline.dag import build_stages, caption, is_report_item
from pipeline.errors import ConfigError

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
            cmd=stage.cmd,
            values=stage.param_values(PARAMS),
        threads: stage.threads
        conda:
            "envs/pipeline.yaml"
        resources:
            gpu=stage.gpu if USE_GPU else 0,
            mem_mb=stage.mem_mb,
            runtime=stage.runtime,
        shell:
            "{params.cmd} --threads {threads}"
