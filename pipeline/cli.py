"""`python -m pipeline <command>`: thin stage commands that Snakemake and DVC both call.

Each stage command validates params.yaml first (a bad key exits 2 before any work), then reads the
params through a view restricted to the keys its registry entry declares, and calls one function.
"""

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import DeclaredParams, load_params
from pipeline.errors import ConfigError, DataError

EXIT_CONFIG = 2


def _stage(stage_name: str):
    """(the stage, all params, the params view restricted to the keys the stage declares).

    Called before a stage imports its heavy modules, so bad config fails fast and alone. All
    params serve only the DAG's structure (which runs a table has); values come from the view.
    """
    from pipeline.dag import build_stages

    params = load_params()
    stages = {stage.name: stage for stage in build_stages(params)}
    if stage_name not in stages:
        raise ConfigError(f"stage '{stage_name}' is not in the DAG for these params")
    stage = stages[stage_name]
    return stage, params, DeclaredParams(params, stage.params)


def _declared(stage_name: str) -> DeclaredParams:
    return _stage(stage_name)[2]


def cmd_synth(args) -> None:
    params = _declared("synth")
    from pipeline.data import synth

    fields = params.synth.model_dump(exclude_none=True)
    try:
        spec = synth.WorldSpec(**fields)
    except ValueError as err:
        raise ConfigError(f"params: synth: {err}") from None
    raw = Path(params.datasets.synth.raw)
    summary = synth.generate_world(raw, spec, workers=args.threads)
    synth.write_sample_figure(raw, Path("results/figures/synth_samples.png"), spec)
    print(f"synth: {summary}")


def cmd_ingest(args) -> None:
    params = _declared(f"ingest_{args.dataset}")
    from pipeline.data.ingest import ingest

    source = params.datasets[args.dataset]
    cfg = params.ingest
    summary = ingest(
        Path(source.raw),
        Path(f"data/shards/{args.dataset}"),
        fmt=source.format,
        split=source.split,
        short_side=cfg.short_side,
        num_shards=cfg.num_shards,
        codec=cfg.codec,
        jpeg_quality=cfg.jpeg_quality,
        min_frames=cfg.min_frames,
        workers=args.threads,
        strict=cfg.strict,
        seed=cfg.seed,
        percents=cfg.percents,
    )
    print(f"ingest: {summary}")


def cmd_data_report(args) -> None:
    _declared(f"data_report_{args.dataset}")
    from pipeline.report import write_data_report

    write_data_report(
        Path(f"data/shards/{args.dataset}"),
        Path(f"results/reports/data_{args.dataset}.txt"),
        Path(f"results/figures/data_{args.dataset}.png"),
    )


def cmd_train(args) -> None:
    from pipeline.dag import RunSpec, run_dir, train_stage

    run = RunSpec(args.method, args.seed, args.augment, args.tau, args.lam)
    # Built from the arguments, not looked up: a run outside every table (an ablation) works too.
    stage = train_stage(args.dataset, run)
    all_params = load_params()
    params = DeclaredParams(all_params, stage.params)
    from pipeline.config import lookup
    from pipeline.finetune import ClipSpec, train_run

    declared = {key: lookup(all_params, key) for key in stage.params}
    train_run(
        Path(f"data/shards/{args.dataset}"),
        Path(run_dir(args.dataset, run.name)),
        run=run,
        split=params.datasets[args.dataset].split,
        clips=ClipSpec(**params.clips.model_dump()),
        model=params.model.model_dump(),
        train=params.train.model_dump(),
        augment=params.augment.model_dump() if run.augment else None,
        selfkd=params.selfkd if run.method == "selfkd" else None,
        threads=args.threads,
        params=declared,
        init=args.init,
    )


def cmd_table(args) -> None:
    _, all_params, params = _stage(args.table)
    from pipeline.dag import run_dir, selfkd_runs
    from pipeline.tables import write_selfkd_table

    runs = selfkd_runs(all_params)[args.table]
    dirs = {run.name: Path(run_dir(params.dataset, run.name)) for run in runs}
    write_selfkd_table(
        args.table,
        runs,
        dirs,
        Path(f"results/tables/{args.table}.csv"),
        Path(f"results/figures/{args.table}.png"),
    )


def cmd_augment_figure(args) -> None:
    params = _declared(f"augment_figure_{args.dataset}")
    from pipeline.data.augment import VideoAugment, augmentation_figure
    from pipeline.data.shards import ShardStore

    store = ShardStore(Path(f"data/shards/{args.dataset}"))
    row = 0  # the first video: any clip shows whether an op treats every frame alike
    clip = store.read_clip(row, list(range(store.num_frames(row))))
    augment = VideoAugment(**params.augment.model_dump())
    augmentation_figure(
        clip, Path(f"results/figures/augmentations_{args.dataset}.png"), augment=augment
    )


def cmd_dvc_yaml(args) -> None:
    from pipeline.dag import DVC_YAML, build_stages, dvc_yaml

    text = dvc_yaml(build_stages(load_params()))
    path = Path(DVC_YAML)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            sys.exit(f"{DVC_YAML} is stale: run `python -m pipeline dvc-yaml` and commit it")
        print(f"{DVC_YAML} is up to date")
        return
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    print(f"wrote {DVC_YAML}")


def cmd_inspect(args) -> None:
    from pipeline.inspect import describe

    print(describe(Path(args.path)))


def cmd_bench(args) -> None:
    if args.what == "data":
        from pipeline.bench.data import bench_data

        params = load_params()
        source = params.datasets[params.dataset]
        bench_data(Path(source.raw), Path(f"data/shards/{params.dataset}"), clips=args.clips)
    elif args.what == "models":
        from pipeline.bench.models import bench_models

        bench_models()
    elif args.what == "train":
        from pipeline.bench.train import bench_train

        params = load_params()
        bench_train(
            Path(f"data/shards/{params.dataset}"),
            frames=params.clips.frames,
            stride=params.clips.stride,
            crop=params.clips.crop,
            model=params.model.model_dump(),
            batch_size=params.train.batch_size,
            steps=args.steps,
            threads=args.threads,
            split=params.datasets[params.dataset].split,
            val_fraction=params.train.val_fraction,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, func, help: str, dataset: bool = False):
        p = sub.add_parser(name, help=help)
        p.add_argument("--threads", type=int, default=1, help="threads (and workers) to use")
        if dataset:
            p.add_argument("--dataset", required=True, help="a key of `datasets` in params.yaml")
        p.set_defaults(func=func)
        return p

    stage("synth", cmd_synth, "generate the synthetic action world")
    stage("ingest", cmd_ingest, "decode a video dataset into HDF5 shards", dataset=True)
    stage("data-report", cmd_data_report, "summarise a dataset's shards", dataset=True)

    p = stage("train", cmd_train, "train and test one supervised run", dataset=True)
    p.add_argument("--method", choices=["supervised", "selfkd"], required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--augment", action="store_true", help="video-consistent augmentation")
    p.add_argument("--tau", type=float, default=0.0, help="selfkd temperature")
    p.add_argument("--lam", type=float, default=0.0, help="selfkd KL weight")
    p.add_argument("--init", type=Path, help="start from this model.pt instead of random init")

    stage("augment-figure", cmd_augment_figure, "one clip under each augmentation", dataset=True)

    p = stage("table", cmd_table, "assemble a table from its runs' metrics")
    p.add_argument("table", choices=["selfkd_table3", "selfkd_table8"])

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage registry")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    p.set_defaults(func=cmd_dvc_yaml)

    p = sub.add_parser("inspect", help="print a human summary of an artifact")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="print speed figures side by side with the alternative")
    p.add_argument("what", choices=["data", "models", "train"])
    p.add_argument("--clips", type=int, default=200, help="clips to read (bench data)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (bench train)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (bench train)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if getattr(args, "threads", 1) < 1:
        print("--threads must be >= 1", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        args.func(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        sys.exit(1)
