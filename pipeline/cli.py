"""`python -m pipeline <command>`: thin stage commands that Snakemake and DVC both call.

Each stage command validates params.yaml first (a bad key exits 2 before any work), then reads the
params through a view restricted to the keys its registry entry declares, and calls one function.
"""

import argparse
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from pipeline.config import DeclaredParams, load_params
from pipeline.dag import HPKD_VARIANTS, TB_SSL, TEACHER_IMAGE_SETS, WEIGHTINGS
from pipeline.errors import ConfigError, DataError

EXIT_CONFIG = 2
TABLES = (
    "selfkd_table3", "selfkd_table8", "teachers", "table3", "table2", "table4", "table1",
    *(f"tb_table{n}" for n in range(1, 7)), "hpkd_table1", "hpkd_table2",
)  # fmt: skip


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


def run_identity(stage, all_params) -> dict:
    """Everything a resumable stage's result depends on, to key its run (pipeline.train.run_key):
    the declared params' values, the sha256 of its declared code and a key of each input (shards:
    their shard keys; a feature cache: its key; a file: its sha256; another folder: its file
    names and sizes). A rerun after a re-ingest, a rebuilt cache, a new init checkpoint or a code
    change starts afresh instead of resuming the old run."""
    import hashlib

    from pipeline.config import lookup
    from pipeline.io import file_sha256

    code = hashlib.sha256()
    for path in sorted(stage.code):
        code.update(f"{path}\0{file_sha256(path)}\n".encode())
    return {
        "params": {key: lookup(all_params, key) for key in stage.params},
        "code": code.hexdigest(),
        "inputs": {dep: _input_key(Path(dep)) for dep in stage.deps},
    }


def _input_key(path: Path) -> str:
    import hashlib

    from pipeline.io import file_sha256

    if path.is_file():
        return file_sha256(path)
    if (path / "manifest.parquet").is_file():
        from pipeline.teachers.features import shard_keys

        return hashlib.sha256(" ".join(shard_keys(path)[0]).encode()).hexdigest()
    if (path / "cache.json").is_file():
        from pipeline.teachers.features import read_summary

        return str(read_summary(path)["key"])
    if not path.is_dir():
        raise DataError(f"{path}: input missing: run the stage that makes it")
    listing = sorted(
        f"{p.relative_to(path)} {p.stat().st_size}" for p in path.rglob("*") if p.is_file()
    )
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def cmd_synth(args) -> None:
    if args.world == "hmdb51":
        _synth_hmdb(args)
        return
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


def _synth_hmdb(args) -> None:
    """The second world (HMDB51 layout) into datasets.synth_hmdb.raw, and its sample figure."""
    from pipeline.data import synth

    params = _declared("synth_hmdb")

    try:
        source = params.datasets.synth_hmdb
    except AttributeError:
        raise ConfigError("params: datasets.synth_hmdb: missing (the second world)") from None
    if source.format != "hmdb51":
        raise ConfigError("params: datasets.synth_hmdb.format: the second world is hmdb51")
    fields = params.synth_hmdb.model_dump(exclude_none=True)
    try:
        spec = synth.HmdbWorldSpec(**fields)
    except ValueError as err:
        raise ConfigError(f"params: synth_hmdb: {err}") from None
    raw = Path(source.raw)
    summary = synth.generate_hmdb_world(raw, spec, workers=args.threads)
    synth.write_hmdb_sample_figure(raw, Path("results/figures/synth_hmdb_samples.png"), spec)
    print(f"synth: {summary}")


def cmd_ingest(args) -> None:
    params = _declared(f"ingest_{args.dataset}")
    from pipeline.data.ingest import ingest
    from pipeline.locks import hold

    source = params.datasets[args.dataset]
    cfg = params.ingest
    out = Path(f"data/shards/{args.dataset}")
    with hold(out):
        summary = ingest(
            Path(source.raw),
            out,
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
    import dataclasses

    from pipeline.dag import RunSpec, run_dir, train_stage
    from pipeline.locks import hold

    run = RunSpec(args.method, args.seed, args.augment, args.tau, args.lam, args.tau_squared)
    if args.init is not None:
        from pipeline.io import file_sha256

        # The init checkpoint names the run: an ad-hoc run never writes into a table's run.
        run = dataclasses.replace(run, init=file_sha256(_checkpoint_file(args.init))[:12])
    # Built from the arguments, not looked up: a run outside every table (an ablation) works too.
    stage = train_stage(args.dataset, run)
    all_params = load_params()
    params = DeclaredParams(all_params, stage.params)
    from pipeline.finetune import ClipSpec, train_run

    out = Path(run_dir(args.dataset, run.name))
    with hold(out):
        train_run(
            Path(f"data/shards/{args.dataset}"),
            out,
            run=run,
            split=params.datasets[args.dataset].split,
            clips=ClipSpec(**params.clips.model_dump()),
            model=params.model.model_dump(),
            train=params.train.model_dump(),
            augment=params.augment.model_dump() if run.augment else None,
            selfkd=params.selfkd if run.method == "selfkd" else None,
            threads=args.threads,
            params=run_identity(stage, all_params),
            init=args.init,
        )


def _checkpoint_file(path: Path) -> Path:
    """`path` if it is a file; a one-line DataError if it is missing or a folder."""
    if not path.exists():
        raise DataError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise DataError(f"{path}: is a folder, not a checkpoint file (model.pt)")
    return path


def cmd_table(args) -> None:
    if args.table == "teachers":
        return _teachers_table()
    if args.table in ("table3", "table2", "table4", "table1"):
        return _dtg_table(args.table)
    if args.table.startswith(("tb_", "hpkd_")):
        return _runs_table(args.table)
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


def cmd_teacher(args) -> None:
    stage, all_params, params = _stage(f"teacher_{args.name}")
    from pipeline.dag import teacher_dir, teacher_images
    from pipeline.locks import hold
    from pipeline.teachers.make import make_teacher

    out = Path(teacher_dir(args.name))
    with hold(out):
        make_teacher(
            args.name,
            params.teachers[args.name].model_dump(),
            synthetic=params.teachers.synthetic.model_dump(),
            images=Path(teacher_images(all_params, args.name)),
            out_dir=out,
            init=Path(teacher_dir("imagenet")) / "model.pt",
            threads=args.threads,
            identity=run_identity(stage, all_params),
        )


def cmd_features(args) -> None:
    params = _declared(f"features_{args.dataset}_{args.teacher}")
    from pipeline.dag import features_dir, teacher_dir
    from pipeline.io import file_sha256
    from pipeline.locks import hold
    from pipeline.teachers import load_teacher
    from pipeline.teachers.features import build_feature_cache

    checkpoint = Path(teacher_dir(args.teacher)) / "model.pt"
    parts_size = params.features.parts_size if args.teacher == "schp" else 8
    out = Path(features_dir(args.dataset, args.teacher))
    with hold(out):
        build_feature_cache(
            shard_dir=Path(f"data/shards/{args.dataset}"),
            teacher=load_teacher(checkpoint, parts_size=parts_size),
            checkpoint_sha256=file_sha256(checkpoint),
            out_dir=out,
            dataset=args.dataset,
            batch_size=params.features.batch_size,
            device=params.features.device,
            threads=args.threads,
        )


def cmd_teacher_probe(args) -> None:
    params = _declared(f"probe_{args.dataset}_{args.teacher}")
    from pipeline.dag import features_dir, probe_dir
    from pipeline.io import write_json_atomic
    from pipeline.teachers.features import probe_teacher

    metrics = probe_teacher(
        Path(features_dir(args.dataset, args.teacher)),
        Path(f"data/shards/{args.dataset}"),
        split=params.datasets[args.dataset].split,
        val_fraction=params.dtg.finetune.val_fraction,
        labeled_percent=params.dtg.labeled_percent,
    )
    write_json_atomic(Path(probe_dir(args.dataset, args.teacher)) / "metrics.json", metrics)
    print(f"{args.teacher}: linear probe top-1 {metrics['test']['top1']:.1f}% on the test split")


def _trainer_fields(section) -> dict:
    """A TrainParams section as the trainer's keywords (validation carving is the run's)."""
    fields = section.model_dump()
    fields.pop("val_fraction")
    return fields


def cmd_pretrain(args) -> None:
    from pipeline.dag import DTGRun, features_dir, pretrain_stage, run_dir, single_finetunes

    run = DTGRun(
        tuple(args.teachers.split(",")),
        args.weighting,
        args.seed,
        args.student,
        args.anchor,
        args.guidance,
        args.overlap,
    )
    all_params = load_params()
    # Built from the arguments, not looked up: a run outside every table (an ablation) works too.
    stage = pretrain_stage(all_params, args.dataset, run)
    params = DeclaredParams(all_params, stage.params)
    from pipeline.locks import hold
    from pipeline.pretrain import pretrain_dtg, single_teacher_accuracies

    dtg = params.dtg
    accuracies = None
    if run.weighting == "offline":
        singles = zip(run.teachers, single_finetunes(run), strict=True)
        accuracies = single_teacher_accuracies(
            {t: Path(run_dir(args.dataset, name)) for t, name in singles}, dtg.offline_from
        )
    online = run.weighting.startswith("online")
    out = Path(run_dir(args.dataset, run.name))
    clips = {
        "segments": 1 if run.anchor == "img" else dtg.segments,
        "crop": dtg.crop,
        "guidance": run.guidance,
        "overlap": run.overlap,
        "flip": dtg.anchor_flip,
    }
    method = {"tau": dtg.tau, "queue_size": dtg.queue_size, "proj_hidden": dtg.proj_hidden}
    if online:
        method["online1_temperature"] = dtg.online1_temperature
        method["online2_temperature"] = dtg.online2_temperature
    with hold(out):
        pretrain_dtg(
            shard_dir=Path(f"data/shards/{args.dataset}"),
            caches={t: Path(features_dir(args.dataset, t)) for t in run.teachers},
            run_dir=out,
            split=params.datasets[args.dataset].split,
            teachers=run.teachers,
            weighting="equal" if run.weighting == "single" else run.weighting,
            offline_accuracies=accuracies,
            model=dtg.students[run.student].model_dump(),
            clips=clips,
            dtg=method,
            train=_trainer_fields(dtg.pretrain),
            seed=run.seed,
            threads=args.threads,
            params=run_identity(stage, all_params),
            figure=Path(f"results/figures/{run.name}_weights.png") if online else None,
        )


def cmd_finetune(args) -> None:
    from pipeline.dag import FinetuneRun, RunSpec, features_dir, run_dir, teacher_dir
    from pipeline.finetune import ClipSpec, train_run
    from pipeline.locks import hold

    teachers = tuple(args.guided_by.split(",")) if args.guided_by else ()
    run = FinetuneRun(
        args.student, args.seed, init_teacher=args.init_teacher or "", guided_by=teachers
    )
    # A pretrained run is named by its pretraining run (FinetuneRun.name for a DTGRun).
    name = f"ft_{args.pretrained}" if args.pretrained else run.name
    stage, all_params, params = _stage(f"finetune_{args.dataset}_{name}")
    dtg = params.dtg
    guided = None
    if args.guided_by:
        guided = {
            "caches": {t: Path(features_dir(args.dataset, t)) for t in teachers},
            "segments": dtg.segments,
            "guidance": dtg.guidance,
            "overlap": dtg.overlap,
            "flip": dtg.anchor_flip,
            "alpha": dtg.alpha,
            "beta": dtg.beta,
            "tau": dtg.tau,
            "queue_size": dtg.queue_size,
            "proj_hidden": dtg.proj_hidden,
        }
    out = Path(run_dir(args.dataset, name))
    with hold(out):
        train_run(
            Path(f"data/shards/{args.dataset}"),
            out,
            run=RunSpec("supervised", args.seed, augment=False),
            split=params.datasets[args.dataset].split,
            clips=ClipSpec(**dtg.finetune_clips.model_dump()),
            model=dtg.students[args.student].model_dump(),
            train=dtg.finetune.model_dump(),
            augment=None,
            threads=args.threads,
            params=run_identity(stage, all_params),
            init=Path(run_dir(args.dataset, args.pretrained)) / "model.pt"
            if args.pretrained
            else None,
            init_teacher=Path(teacher_dir(args.init_teacher)) / "model.pt"
            if args.init_teacher
            else None,
            labeled_percent=dtg.labeled_percent,
            guided=guided,
        )


def _teachers_table() -> None:
    _, all_params, params = _stage("teachers_table")
    from pipeline.dag import TEACHER_IMAGE_SETS, features_dir, teacher_dir
    from pipeline.tables import teacher_table, write_table

    names = list(TEACHER_IMAGE_SETS)
    table = teacher_table(
        names,
        {name: Path(teacher_dir(name)) for name in names},
        {name: Path(features_dir(params.dataset, name)) for name in names},
    )
    write_table(table, Path("results/tables/teachers.csv"))


def _dtg_table(name: str) -> None:
    _, all_params, params = _stage(name)
    from pipeline.dag import ALL_TEACHERS, dtg_tables, probe_dir, run_dir, table_probes, teacher_dir
    from pipeline.tables import write_dtg_table

    rows = dtg_tables(all_params)[name]
    runs = {run.name for _, run in rows} | {
        run.pretrained.name for _, run in rows if run.pretrained
    }
    write_dtg_table(
        name,
        rows,
        {run: Path(run_dir(params.dataset, run)) for run in runs},
        {t: Path(teacher_dir(t)) for t in ALL_TEACHERS},
        {t: Path(probe_dir(params.dataset, t)) for t in table_probes(name)},
        Path(f"results/tables/{name}.csv"),
        Path(f"results/figures/{name}.png"),
    )


def _runs_table(name: str) -> None:
    """A TimeBalance or human-parsing KD table: its rows' runs, one folder each."""
    _, all_params, params = _stage(name)
    from pipeline import dag, tables

    method = "tb" if name.startswith("tb_") else "hpkd"
    rows = getattr(dag, f"{method}_tables")(all_params)[name]
    getattr(tables, f"write_{method}_table")(
        name,
        rows,
        {run.name: Path(dag.run_dir(params.dataset, run.name)) for _, run in rows},
        Path(f"results/tables/{name}.csv"),
        Path(f"results/figures/{name}.png"),
    )


def cmd_tsne(args) -> None:
    _, all_params, params = _stage(f"tsne_{args.dataset}")
    from pipeline.dag import run_dir, tsne_runs
    from pipeline.figures import tsne_figure
    from pipeline.finetune import ClipSpec, test_features

    dtg = params.dtg
    features = {}
    for label, run in tsne_runs(all_params).items():
        features[label], labels, names = test_features(
            Path(f"data/shards/{args.dataset}"),
            Path(run_dir(args.dataset, run.name)) / "model.pt",
            model=dtg.students[dtg.student].model_dump(),
            clips=ClipSpec(**dtg.finetune_clips.model_dump()),
            split=params.datasets[args.dataset].split,
            threads=args.threads,
        )
    tsne_figure(
        features,
        labels,
        names,
        Path(f"results/figures/dtg_tsne_{args.dataset}.png"),
        title="Test-split features without and with supervised DTG (DTG-Net Figure 4)",
    )


def _ssl_runs(value: str) -> tuple[str, ...]:
    """argparse type: one or two comma-separated SSL runs (dag.TB_SSL)."""
    names = tuple(value.split(","))
    unknown = [n for n in names if n not in TB_SSL]
    if unknown or not 1 <= len(names) <= 2:
        raise argparse.ArgumentTypeError(
            f"{value!r}: one or two of {', '.join(TB_SSL)}, comma-separated"
        )
    return names


def _pair(value: str) -> tuple[str, ...]:
    names = _ssl_runs(value)
    if len(names) != 2:
        raise argparse.ArgumentTypeError(f"{value!r}: two SSL runs, comma-separated")
    return names


def cmd_tb_ssl(args) -> None:
    stage, all_params, params = _stage(f"tb_ssl_{args.dataset}_{args.run}")
    from pipeline.dag import run_dir, tb_ssl_params, tb_ssl_run
    from pipeline.locks import hold
    from pipeline.timebalance import pretrain_ssl_teacher

    tb = params.timebalance
    out = Path(run_dir(args.dataset, tb_ssl_run(args.run)))
    with hold(out):
        pretrain_ssl_teacher(
            kind=TB_SSL[args.run].kind,
            shard_dir=Path(f"data/shards/{args.dataset}"),
            run_dir=out,
            split=params.datasets[args.dataset].split,
            model=tb.backbone.model_dump(),
            ssl=tb_ssl_params(tb.ssl.model_dump(), args.run),
            train=_trainer_fields(tb.ssl.pretrain),
            seed=TB_SSL[args.run].seed,
            threads=args.threads,
            params=run_identity(stage, all_params),
        )


def cmd_tb_similarity(args) -> None:
    from pipeline.dag import run_dir, tb_similarity_outs, tb_ssl_params, tb_ssl_run

    outs = tb_similarity_outs(args.dataset, args.pair)
    _, _, params = _stage(Path(outs["table"]).stem)
    from pipeline.data.render import motion_only_actions
    from pipeline.figures import similarity_figures
    from pipeline.io import write_json_atomic
    from pipeline.timebalance import motion_only_report, similarity_table, write_parquet

    tb = params.timebalance
    table = similarity_table(
        shard_dir=Path(f"data/shards/{args.dataset}"),
        teachers={
            name: (
                TB_SSL[name].kind,
                Path(run_dir(args.dataset, tb_ssl_run(name))),
                tb_ssl_params(tb.ssl.model_dump(), name),
            )
            for name in args.pair
        },
        split=params.datasets[args.dataset].split,
        model=tb.backbone.model_dump(),
        clamp=tb.similarity_clamp,
        threads=args.threads,
    )
    report = motion_only_report(table, motion_only_actions())
    verdict = report["motion_only"]
    similarity_figures(
        table,
        verdict["classes"] if isinstance(verdict, dict) else [],
        outs["histogram"],
        outs["classes"],
        title=f"TimeBalance temporal similarity s ({args.dataset}, {' + '.join(args.pair)})",
    )
    write_json_atomic(outs["report"], report)
    write_parquet(table, outs["table"])  # last: the table marks the stage complete
    if isinstance(verdict, dict):
        print(
            f"s: motion-only classes {verdict['mean_s']:.3f}, others {verdict['others_mean_s']:.3f}"
            f" (Welch p {verdict['welch_p']:.2g}): lower: {verdict['lower']}"
        )


def _tb_train(args, run) -> None:
    """A TimeBalance fine-tune (f_S, f_I, f_D) or student run: train_run on its labeled budget."""
    command = "tb_student" if run.teachers else "tb_finetune"
    stage, all_params, params = _stage(f"{command}_{args.dataset}_{run.name}")
    from pipeline.config import budget_epochs
    from pipeline.dag import RunSpec, run_dir, tb_pair, tb_similarity_outs, tb_ssl_run
    from pipeline.finetune import ClipSpec, train_run
    from pipeline.locks import hold

    tb = params.timebalance
    student = None
    if run.teachers:
        # Two teachers fill Eq. 7's slots in order, p_T = s p_first + (1 - s) p_second; one
        # teacher takes the slot of its SSL kind (either gives p_T = its p).
        slots = (
            ("invariant", "distinctive")
            if len(run.teachers) == 2
            else ("invariant" if TB_SSL[run.teachers[0]].kind == "invariant" else "distinctive",)
        )
        student = {
            "teachers": {
                slot: Path(run_dir(args.dataset, t.name)) / "model.pt"
                for slot, t in zip(slots, run.teacher_runs, strict=True)
            },
            "scores": Path(tb_similarity_outs(args.dataset, tb_pair(run))["table"]),
            "variant": "both" if len(slots) == 2 else slots[0],
            "reweight": run.reweight,
            **tb.student.model_dump(exclude={"train"}),
        }
        if run.distance:
            student["distance"] = run.distance
    out = Path(run_dir(args.dataset, run.name))
    init = None if run.init == "random" else Path(run_dir(args.dataset, tb_ssl_run(run.init)))
    with hold(out):
        train_run(
            Path(f"data/shards/{args.dataset}"),
            out,
            run=RunSpec("supervised", run.seed, augment=False),
            split=params.datasets[args.dataset].split,
            clips=ClipSpec(**tb.clips.model_dump()),
            model=tb.backbone.model_dump(),
            train=budget_epochs(
                (tb.student.train if student else tb.finetune).model_dump(),
                run.percent,
                tb.equal_steps_percent,
            ),
            augment=None,
            threads=args.threads,
            # the run's budget and variant are arguments, not params: they key it too
            params={**run_identity(stage, all_params), "tb_run": asdict(run)},
            init=None if init is None else init / "model.pt",
            labeled_percent=run.percent,
            student=student,
        )


def tb_run_of(args):
    """The TBRun a tb-finetune or tb-student command line names (a fine-tune has no teachers)."""
    from pipeline.dag import TBRun

    return TBRun(args.init, args.percent, args.seed, args.teachers, args.reweight, args.distance)


def cmd_tb_train(args) -> None:
    _tb_train(args, tb_run_of(args))


def _hpkd_run(args):
    from pipeline.dag import HPKDRun

    return HPKDRun(args.variant, args.backbone, args.seed)


def cmd_hpkd_pretrain(args) -> None:
    run = _hpkd_run(args)
    stage, all_params, params = _stage(f"hpkd_pretrain_{args.dataset}_{run.where}")
    from pipeline.dag import features_dir, run_dir, teacher_dir
    from pipeline.hpkd import pretrain_hpkd
    from pipeline.locks import hold

    hpkd = params.hpkd
    out = Path(run_dir(args.dataset, run.pretrain_name))
    with hold(out):
        pretrain_hpkd(
            variant=run.variant,
            shard_dir=Path(f"data/shards/{args.dataset}"),
            cache_dir=Path(features_dir(args.dataset, "schp")),
            teacher_path=Path(teacher_dir("schp")) / "model.pt",
            run_dir=out,
            parts_png=out / "parts.png",
            split=params.datasets[args.dataset].split,
            model=hpkd.backbones[run.backbone].model_dump(),
            hpkd={**hpkd.pretrain.model_dump(exclude={"train"}),
                  "shared_stages": hpkd.shared_stages},
            train=_trainer_fields(hpkd.pretrain.train),
            seed=run.seed,
            threads=args.threads,
            params=run_identity(stage, all_params),
        )  # fmt: skip


def cmd_hpkd_finetune(args) -> None:
    """Fine-tune a backbone on the labeled budget from its pre-training (or from scratch)."""
    run = _hpkd_run(args)
    stage, all_params, params = _stage(f"hpkd_finetune_{args.dataset}_{run.where}")
    from pipeline.dag import RunSpec, run_dir
    from pipeline.finetune import ClipSpec, train_run
    from pipeline.hpkd import hpkd_model
    from pipeline.locks import hold

    hpkd = params.hpkd
    out = Path(run_dir(args.dataset, run.name))
    init = None if run.variant == "scratch" else Path(run_dir(args.dataset, run.pretrain_name))
    with hold(out):
        train_run(
            Path(f"data/shards/{args.dataset}"),
            out,
            run=RunSpec("supervised", run.seed, augment=False),
            split=params.datasets[args.dataset].split,
            clips=ClipSpec(**hpkd.clips.model_dump()),
            model=hpkd_model(
                hpkd.backbones[run.backbone].model_dump(), run.variant, hpkd.shared_stages
            ),  # fmt: skip
            train=hpkd.finetune.model_dump(),
            augment=None,
            threads=args.threads,
            params={**run_identity(stage, all_params), "hpkd_run": asdict(run)},
            init=None if init is None else init / "model.pt",
            labeled_percent=hpkd.labeled_percent,
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
    elif args.what == "gpu":
        from pipeline.bench.gpu import bench_gpu

        bench_gpu(steps=args.steps, cpu_steps=args.cpu_steps, threads=args.threads)
    elif args.what == "features" and args.real_size:
        from pipeline.bench.features import bench_features_real_size

        bench_features_real_size(steps=args.steps, cpu_steps=args.cpu_steps, threads=args.threads)
    elif args.what == "features":
        from pipeline.bench.features import run
        from pipeline.dag import ALL_TEACHERS, features_dir, teacher_dir

        params = load_params()
        dtg = params.dtg
        run(
            Path(f"data/shards/{params.dataset}"),
            teacher_paths={t: Path(teacher_dir(t)) / "model.pt" for t in ALL_TEACHERS},
            cache_dirs={t: Path(features_dir(params.dataset, t)) for t in ALL_TEACHERS},
            model=dtg.students[dtg.student].model_dump(),
            segments=dtg.segments,
            crop=dtg.crop,
            guidance=dtg.guidance,
            overlap=dtg.overlap,
            batch_size=dtg.pretrain.batch_size,
            threads=args.threads,
            steps=args.steps,
            split=params.datasets[params.dataset].split,
            dtg={"tau": dtg.tau, "queue_size": dtg.queue_size, "proj_hidden": dtg.proj_hidden},
        )
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

    p = stage("synth", cmd_synth, "generate the synthetic action world")
    p.add_argument(
        "--world",
        choices=["ucf101", "hmdb51"],
        default="ucf101",
        help="ucf101: the first world (params `synth`); hmdb51: the second (`synth_hmdb`)",
    )
    stage("ingest", cmd_ingest, "decode a video dataset into HDF5 shards", dataset=True)
    stage("data-report", cmd_data_report, "summarise a dataset's shards", dataset=True)

    p = stage("train", cmd_train, "train and test one supervised run", dataset=True)
    p.add_argument("--method", choices=["supervised", "selfkd"], required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--augment", action="store_true", help="video-consistent augmentation")
    p.add_argument("--tau", type=float, default=0.0, help="selfkd temperature")
    p.add_argument("--lam", type=float, default=0.0, help="selfkd KL weight")
    p.add_argument("--tau-squared", action="store_true", help="selfkd: tau^2 on the KL term")
    p.add_argument("--init", type=Path, help="start from this model.pt instead of random init")

    stage("augment-figure", cmd_augment_figure, "one clip under each augmentation", dataset=True)

    p = stage("teacher", cmd_teacher, "train or import a frozen image teacher")
    p.add_argument("--name", required=True, choices=list(TEACHER_IMAGE_SETS))
    p = stage("features", cmd_features, "cache a teacher's per-frame outputs", dataset=True)
    p.add_argument("--teacher", required=True, choices=list(TEACHER_IMAGE_SETS))

    p = stage("teacher-probe", cmd_teacher_probe, "linear probe of a teacher's cache", dataset=True)
    p.add_argument("--teacher", required=True, choices=list(TEACHER_IMAGE_SETS))

    stage("tsne", cmd_tsne, "t-SNE of supervised runs with and without DTG", dataset=True)

    p = stage("pretrain", cmd_pretrain, "DTG-Net self-supervised pretraining", dataset=True)
    p.add_argument("--teachers", required=True, help="comma-separated teacher names")
    p.add_argument("--weighting", required=True, choices=WEIGHTINGS)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--student", required=True, choices=["r3d", "tsn"])
    p.add_argument("--anchor", required=True, choices=["img", "seq"])
    p.add_argument("--guidance", required=True, choices=["img", "seq"])
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, required=True)

    p = stage("finetune", cmd_finetune, "fine-tune and test a DTG student", dataset=True)
    p.add_argument("--student", required=True, choices=["r3d", "tsn"])
    p.add_argument("--seed", type=int, required=True)
    init = p.add_mutually_exclusive_group()
    init.add_argument("--pretrained", help="a pretrain run's name: start from its model.pt")
    init.add_argument(
        "--init-teacher", choices=list(TEACHER_IMAGE_SETS), help="start from a 2D teacher"
    )
    init.add_argument("--guided-by", help="supervised DTG with these comma-separated teachers")

    p = stage("tb-ssl", cmd_tb_ssl, "TimeBalance: pre-train an SSL teacher", dataset=True)
    p.add_argument("--run", required=True, choices=list(TB_SSL), help="an SSL run (dag.TB_SSL)")
    p = stage("tb-similarity", cmd_tb_similarity, "TimeBalance: the per-video s", dataset=True)
    p.add_argument("--pair", type=_pair, required=True, help="two SSL runs: a,b")

    p = stage("tb-finetune", cmd_tb_train, "TimeBalance: f_S, f_I or f_D", dataset=True)
    p.set_defaults(teachers=(), reweight=False, distance="")
    p.add_argument("--init", required=True, choices=[*TB_SSL, "random"])
    p.add_argument("--percent", type=int, required=True, help="the labeled budget")
    p.add_argument("--seed", type=int, required=True)
    p = stage("tb-student", cmd_tb_train, "TimeBalance: a student", dataset=True)
    p.add_argument(
        "--teachers", type=_ssl_runs, required=True, help="its fine-tuned teachers' SSL runs, a,b"
    )
    p.add_argument("--reweight", action="store_true", help="mix two teachers by s (else average)")
    p.add_argument("--distance", choices=["l2", "kl", "js"], default="", help="override params")
    p.add_argument("--init", required=True, choices=[*TB_SSL, "random"])
    p.add_argument("--percent", type=int, required=True, help="the labeled budget")
    p.add_argument("--seed", type=int, required=True)

    variants = ["scratch", *HPKD_VARIANTS]
    for name, func, help in (
        ("hpkd-pretrain", cmd_hpkd_pretrain, "human-parsing KD: multi-task pre-training"),
        ("hpkd-finetune", cmd_hpkd_finetune, "human-parsing KD: fine-tune and test"),
    ):
        p = stage(name, func, help, dataset=True)
        p.add_argument("--variant", required=True,
                       choices=HPKD_VARIANTS if name == "hpkd-pretrain" else variants)  # fmt: skip
        p.add_argument("--backbone", required=True, choices=["c3d", "r2plus1d"])
        p.add_argument("--seed", type=int, required=True)

    p = stage("table", cmd_table, "assemble a table from its runs' metrics")
    p.add_argument("table", choices=[*TABLES])

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage registry")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    p.set_defaults(func=cmd_dvc_yaml)

    p = sub.add_parser("inspect", help="print a human summary of an artifact")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="print speed figures side by side with the alternative")
    p.add_argument("what", choices=["data", "models", "train", "features", "gpu"])
    p.add_argument("--clips", type=int, default=200, help="clips to read (bench data)")
    p.add_argument(
        "--steps", type=int, default=40, help="timed steps (bench train, features; on the GPU: gpu)"
    )
    p.add_argument(
        "--cpu-steps", type=int, default=2, help="timed CPU steps (bench gpu, features --real-size)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (bench train, features, gpu)"
    )
    p.add_argument(
        "--real-size",
        action="store_true",
        help="bench features with R3D-18 and ResNet-50 teachers at 224 px on synthetic clips",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if getattr(args, "threads", 1) < 1:
        print("--threads must be >= 1", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if "LOCAL_WORLD_SIZE" in os.environ and hasattr(args, "threads"):
        # Under torchrun a stage's threads are its node's: its processes share them.
        args.threads = max(1, args.threads // int(os.environ["LOCAL_WORLD_SIZE"]))
    try:
        args.func(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        sys.exit(1)
