"""The human-parsing KD method's pre-training stage (losses and step: pipeline.methods.hpkd).

`pretrain_hpkd` trains one variant ("full", "ti" or "rsp") with pipeline.train.fit on
SpeedPairDataset items of every train-split video, labels withheld, and writes into run_dir:
  model.pt      the network (fit's {"model": state_dict, "meta"}): fine-tuning starts from it
  metrics.json  fit's metrics plus the variant, the videos, the per-epoch history and, for the KD
                variants, how well the decoder reproduces the teacher's part maps on test clips
and, for the KD variants, `parts_png`: the decoder's part maps beside the teacher's on test clips.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.data.augment import VideoAugment
from pipeline.data.clips import select_rows
from pipeline.data.shards import read_manifest
from pipeline.data.speed import SpeedPairDataset, left_right_swap
from pipeline.io import write_json_atomic
from pipeline.methods.hpkd import HPKD, parsing_kd_loss
from pipeline.models import build_video_model
from pipeline.teachers import read_teacher_checkpoint
from pipeline.teachers.features import FeatureCache
from pipeline.train import TIMING_FIELDS, TrainSpec, fit, full_batch_loader, seed_everything

FIGURE_CLIPS = 6  # test clips in the part-map figure


def hpkd_model(model: Mapping, variant: str, shared_stages: int) -> dict:
    """build_video_model's keywords for a variant: two branches for "full", one otherwise."""
    return {**model, "branches": 2 if variant == "full" else 1, "shared_stages": shared_stages}


def speed_dataset(shard_dir: Path, rows, hpkd: Mapping, *, seed: int, parts=None, swap=None,
                  train: bool = True) -> SpeedPairDataset:  # fmt: skip
    """The method's items; `train=False`: no flip or colour draws (the figure's clips)."""
    augment = hpkd["augment"] if train and hpkd["augment"]["ops"] else None
    return SpeedPairDataset(
        shard_dir,
        rows=rows,
        frames=hpkd["clip_frames"],
        crop_size=hpkd["crop"],
        seed=seed,
        flip=hpkd["flip"] and train,
        augment=VideoAugment(**augment) if augment else None,
        parts=parts,
        swap=swap,
        parts_out=hpkd["parts_out"],
    )


def build_hpkd(variant: str, model: Mapping, hpkd: Mapping, num_parts: int, seed: int) -> HPKD:
    """The method of `variant` on a fresh network (model: build_video_model's keywords + name)."""
    network = build_video_model(num_classes=0, **hpkd_model(model, variant, hpkd["shared_stages"]))
    weights = hpkd["weights"]
    return HPKD(
        network,
        variant=variant,
        num_parts=num_parts,
        parts_size=hpkd["parts_out"],
        decoder_hidden=hpkd["decoder_hidden"],
        decoder_upscale=hpkd["decoder_upscale"],
        kd_weight=weights["kd"],
        motion_weight=weights["motion"],
        appearance_weight=weights["appearance"],
        embed_dim=hpkd["embed_dim"],
        tau=hpkd["tau"],
        margin=hpkd["margin"],
        momentum=hpkd["momentum"],
        queue_size=hpkd["queue_size"],
        queue_seed=seed,
    )


def pretrain_hpkd(
    *,
    variant: str,
    shard_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    teacher_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    parts_png: str | os.PathLike | None,
    split: int,
    model: dict,
    hpkd: Mapping,
    train: dict,
    seed: int,
    threads: int,
    params: dict,
) -> dict:
    """Pre-train `variant` on the unlabeled train videos; returns metrics.json's dict.

    cache_dir: the parsing teacher's feature cache; teacher_path: its model.pt (for its part
    names: a flip swaps Left-/Right- parts). train: TrainSpec's fields plus batch_size, workers.
    params (the stage's identity) keys the run: a rerun resumes, anything else starts afresh."""
    shard_dir, run_dir = Path(shard_dir), Path(run_dir)
    train = dict(train)
    batch_size = train.pop("batch_size")
    workers = train.pop("workers")
    spec = TrainSpec(**train, seed=seed, threads=threads)
    manifest = read_manifest(shard_dir)
    kd = variant != "rsp"
    parts = FeatureCache(cache_dir, shard_dir) if kd else None
    classes = read_teacher_checkpoint(teacher_path)["classes"] if kd else []
    swap = left_right_swap(classes) if kd else None
    rows = select_rows(manifest, f"split{split}", "train")
    dataset = speed_dataset(shard_dir, rows, hpkd, seed=seed, parts=parts, swap=swap)
    loader = full_batch_loader(dataset, batch_size=batch_size, seed=seed, num_workers=workers,
                               device=spec.device, source=shard_dir)  # fmt: skip
    seed_everything(seed)  # before building: initial weights depend on the seed alone
    method = build_hpkd(variant, model, hpkd, len(classes), seed)
    run_params = {"params": params, "variant": variant, "split": split, "model": model,
                  "hpkd": dict(hpkd), "batch_size": batch_size}  # fmt: skip
    metrics = fit(method, loader, run_dir=run_dir, params=run_params, spec=spec)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes, as in fit
        return metrics
    history = json.loads((run_dir / "history.json").read_text())
    metrics |= {
        "variant": variant,
        "pretrain_videos": len(dataset),
        "steps_per_epoch": len(loader),
        "history": [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history],
    }
    if kd:
        test = select_rows(manifest, f"split{split}", "test")
        clips = speed_dataset(shard_dir, test, hpkd, seed=0, parts=parts, swap=swap, train=False)
        metrics["test_parts"], shown = part_agreement(method.cpu().eval(), clips)
        if parts_png is not None:
            from pipeline.figures import part_maps_figure

            title = f"Part maps on test clips: teacher vs g_h ({run_dir.name})"
            part_maps_figure(*shown, classes, parts_png, title=title)
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def part_agreement(method: HPKD, clips: SpeedPairDataset, batch_size: int = 64):
    """The decoder against the teacher on `clips`: mean Eq. 4 loss and the share of positions
    whose most likely part agrees; and the first FIGURE_CLIPS (middle frames, teacher maps,
    predicted maps) for the figure."""
    loader = torch.utils.data.DataLoader(clips, batch_size=batch_size, shuffle=False)
    losses, agree, shown = [], [], None
    for batch in loader:
        predicted = method.predict_parts(batch["video"])
        losses.append(
            parsing_kd_loss(predicted.clamp_min(1e-8).log(), batch["parts"]) * len(predicted)
        )
        agree.append((predicted.argmax(1) == batch["parts"].argmax(1)).float().mean((1, 2)))
        if shown is None:
            video = batch["video"][:FIGURE_CLIPS]
            middle = video[:, :, video.shape[2] // 2].permute(0, 2, 3, 1)
            shown = (middle.numpy(), batch["parts"][:FIGURE_CLIPS].numpy(),
                     predicted[:FIGURE_CLIPS].numpy())  # fmt: skip
    agreement = torch.cat(agree)
    return {
        "kd_loss": float(sum(losses) / len(agreement)),
        "argmax_agreement": float(agreement.mean()),
        "clips": len(agreement),
    }, shown
