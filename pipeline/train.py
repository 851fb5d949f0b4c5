"""The one trainer every method uses: checkpoint/resume, determinism, logging, AMP, DDP.

`fit(method, train_loader, val_loader=..., run_dir=..., params=..., spec=TrainSpec(...))` trains a
pipeline.methods.Method and writes into run_dir:
  checkpoints/last.pt    after every epoch (atomic): method/optimizer/scheduler/scaler state, RNG
                         states of every rank, params, run key, best metric, history
  checkpoints/key.json   the run key (sha256 of the canonical JSON of params + result-affecting
                         spec fields) and the params it was computed from
  history.json           one record per epoch (also in the checkpoint)
  dvclive/               DVCLive metrics per epoch (step = epoch)
  model.pt, metrics.json at the end (atomic): final `method.model` weights + meta; final metrics

A rerun with the same key resumes from last.pt at the next epoch with every RNG restored, so the
result equals an uninterrupted run; a different key starts fresh and deletes the old checkpoints.
A finished run deletes its checkpoints: only a killed run resumes.

Distributed (torchrun, WORLD_SIZE > 1): fit joins the process group (nccl on CUDA, gloo on CPU),
synchronises batch norm, wraps the whole method in DistributedDataParallel, and only rank 0 writes
files. The train loader must shard by rank (`make_loader` splits the global batch into equal,
interleaved shares: pipeline/distributed.py); the val loader is evaluated in full on every rank,
so hooks such as a teacher refresh make the same decision everywhere.
"""

import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from tqdm.auto import tqdm

from pipeline.data.clips import prepare_video
from pipeline.distributed import distributed_env, rank_shard, synchronise_batch_norm
from pipeline.errors import DataError
from pipeline.evaluate import evaluate
from pipeline.io import atomic_path, write_json_atomic
from pipeline.methods import Method

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cosine", "plateau", "constant")
AMP_MODES = ("off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
# Spec fields that change how fast a run goes, not what it computes (on CPU): left out of the run
# key so a run can resume on another machine or with other thread counts.
RUNTIME_FIELDS = ("threads", "device", "deterministic")
# History fields that vary from run to run; kept out of metrics.json so it is reproducible.
TIMING_FIELDS = ("clips_per_s", "epoch_seconds")


@dataclass(frozen=True)
class TrainSpec:
    """How to train. The lr moves every step (`lr_factor`): a linear warm-up over the first
    warmup_epochs, then the schedule.

    schedule: "constant"; "step" (lr * gamma ** number of milestones <= epoch); "cosine" (from lr
    at the end of warm-up towards 0 at the end of the last epoch); "plateau" (multiply by
    plateau_factor when the monitored metric has not improved for more than plateau_patience
    checks; the monitored metric is the validation top-1, video-level when available, else the
    training loss).
    optimizer: "sgd" (momentum, nesterov, weight_decay) or "adam" (weight_decay as L2; momentum
    and nesterov unused). grad_clip: max global L2 norm of the gradients, or None.
    amp: "off" | "bf16" (autocast) | "fp16" (autocast + GradScaler). channels_last: keep 4-D/5-D
    weights and 5-D inputs channels-last (on CPU and CUDA). deterministic: deterministic
    algorithms and no cuDNN autotuning (bit-reproducible; slower on GPU).
    """

    epochs: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    grad_clip: float | None = None
    seed: int = 0
    threads: int = 1
    device: str = "auto"
    amp: str = "off"
    channels_last: bool = False
    val_every: int = 1
    deterministic: bool = True

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        choices = {
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "amp": AMP_MODES,
            "device": DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainSpec.{name} must be one of {allowed}, not {getattr(self, name)!r}"
                )
        for name in ("epochs", "threads", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSpec.{name} must be >= 1")
        if self.warmup_epochs < 0 or self.lr <= 0:
            raise ValueError("TrainSpec.lr must be > 0 and warmup_epochs >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("TrainSpec.grad_clip must be > 0 or None")


# ---------------------------------------------------------------- seeds, keys, checkpoint files


def seed_everything(seed: int) -> None:
    """Seed python, numpy's global RNG and torch (CPU and CUDA). Call before building a model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, *parts: int) -> int:
    """A well-mixed 63-bit seed for (seed, parts...), e.g. the loader's shuffle of one epoch."""
    state = np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy and python from the worker's torch seed (which the
    loader derives from its generator), so augmentations in workers are reproducible."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def canonical_json(obj) -> str:
    """Stable JSON (sorted keys, no spaces; tuples as lists, paths as strings) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def run_key(params: dict, spec: TrainSpec) -> str:
    """sha256 of the params and the spec fields that change results: the identity of a run."""
    result_fields = {k: v for k, v in asdict(spec).items() if k not in RUNTIME_FIELDS}
    return hashlib.sha256(
        canonical_json({"params": params, "train": result_fields}).encode()
    ).hexdigest()


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """torch.save, atomically. Through a file object: given a path, torch.save names the archive's
    records after the (random) temp file, and the same weights would differ byte for byte,
    changing the sha256 that keys downstream caches."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load with weights_only=True; a file that is not plain tensors and containers is
    refused with DataError naming it (a pickled object could run code when loaded), and so is
    anything that is not a checkpoint this pipeline wrote (a folder, a text file, random bytes)."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"{path}: {problem}; expected a checkpoint file (model.pt)")
    if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 writes a zip archive
        raise DataError(f"{path}: not a torch checkpoint (not a zip archive: text? random bytes?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise DataError(
            f"{path}: refused to load: it holds pickled objects beyond tensors and plain "
            f"containers, which could run code (weights_only loading): {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise DataError(f"{path}: not a readable torch checkpoint ({err})") from err


# ---------------------------------------------------------------- RNG state as plain data


def capture_rng_state() -> dict:
    """Python, numpy-global, torch CPU (and CUDA) RNG states as tensors and plain python types,
    so checkpoints load with weights_only=True."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- learning rate


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    schedule: str,
    epochs: int,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
) -> float | None:
    """The multiplier of the base lr at optimisation step `step` (0-based, counted over the whole
    run); None once "plateau" owns the lr. Warm-up and cosine move every step (a warm-up counted in
    whole epochs would leave warmup_epochs=1 doing nothing); "step" changes at epoch milestones."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(step // steps_per_epoch >= m for m in milestones)
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "plateau":
        return None
    raise ValueError(f"unknown schedule {schedule!r}")


def _build_optimizer(parameters, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            parameters,
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            nesterov=spec.nesterov,
        )
    else:
        optimizer = torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # what lr_factor scales; saved with the optimizer
    return optimizer


# ---------------------------------------------------------------- devices, distributed, loaders


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    device: str = "auto",
    distributed: bool = True,
) -> DataLoader:
    """A reproducible DataLoader: seeded generator and workers, pinned memory on CUDA, and under
    torchrun (with `distributed`) each rank's share of the global `batch_size`
    (pipeline.distributed.rank_shard). Validation loaders pass distributed=False: fit evaluates
    the whole set on every rank.

    Workers persist across epochs when the dataset takes (epoch, position) keys (it declares
    `epoch_keys = True`, as ClipDataset does): the sampler then tags each index with the epoch, so
    no set_epoch needs to reach the workers, and no epoch pays for starting them again. Other
    datasets get workers started per epoch, so that their set_epoch reaches them."""
    _, _, local_rank = distributed_env()
    generator = torch.Generator().manual_seed(seed)
    if shuffle:
        # Its own generator: a persistent-worker loader draws from the loader's generator only
        # once (worker seeds), a per-epoch one every epoch, and the order must not depend on that.
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    if distributed:
        sampler, batch_size = rank_shard(sampler, len(dataset), batch_size, drop_last)
    persistent = num_workers > 0 and getattr(dataset, "epoch_keys", False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochTaggedSampler(sampler) if persistent else sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=resolve_device(device, local_rank).type == "cuda",
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=persistent,
    )


def full_batch_loader(
    dataset: Dataset, *, batch_size: int, seed: int, num_workers: int, device: str, source
) -> DataLoader:
    """make_loader for self-supervised pre-training: shuffled, full batches only (contrastive
    losses take the batch's other videos as negatives, and under DDP every rank must gather equal
    batches); a DataError naming `source` when its videos do not fill one batch."""
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
        num_workers=num_workers,
        drop_last=True,
        device=device,
    )
    if len(loader) == 0:
        raise DataError(f"{source}: {len(dataset)} train videos, fewer than a batch")
    return loader


class EpochTaggedSampler(Sampler):
    """Yields (epoch, index) for each index of `sampler`; set_epoch reaches the wrapped one too."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.epoch = 0

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)  # start_epoch reseeds it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _shards_by_rank(loader, world: int) -> bool:
    return any(getattr(part, "num_replicas", None) == world for part in _loader_parts(loader))


def _loader_parts(loader) -> list:
    """The loader's dataset and samplers, down every chain of wrapped samplers: the objects that
    may define set_epoch, a generator or num_replicas."""
    parts = [getattr(loader, "dataset", None)]
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        while sampler is not None and all(sampler is not part for part in parts):
            parts.append(sampler)
            sampler = getattr(sampler, "sampler", None)
    return [part for part in parts if part is not None]


def start_epoch(loader, seed: int, epoch: int) -> None:
    """Make epoch `epoch`'s data order and augmentations depend only on (seed, epoch), not on the
    epochs before it, so a resumed run sees exactly the data an uninterrupted one would."""
    for part in [loader, *_loader_parts(loader)]:
        generator = getattr(part, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(derived_seed(seed, epoch))
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def _batch_size(loader) -> int | None:
    size = getattr(loader, "batch_size", None)
    return (
        size
        if size is not None
        else getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    )


def _to_device(batch: dict, device: torch.device, video_format) -> dict:
    moved = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if name == "video":
                value = prepare_video(value)
            if video_format is not None and value.dim() == 5 and value.is_floating_point():
                value = value.contiguous(memory_format=video_format)
        moved[name] = value
    return moved


def _to_channels_last(module: torch.nn.Module) -> None:
    """Channels-last weights for both 3D (5-D) and 2D (4-D) convolutions of a method."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() in formats:
            tensor.data = tensor.data.contiguous(memory_format=formats[tensor.dim()])


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------- one epoch


def _train_one_epoch(
    step_module: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    *,
    epoch: int,
    spec: "TrainSpec",
    device: torch.device,
    video_format,
    show: bool,
) -> dict:
    """Train one epoch, setting the lr before every step; returns this rank's sums (losses and
    logs weighted by batch size) and the lr of its last step."""
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.amp]
    steps_per_epoch = len(loader)
    schedule = {
        "steps_per_epoch": steps_per_epoch,
        "schedule": spec.schedule,
        "epochs": spec.epochs,
        "milestones": spec.milestones,
        "gamma": spec.gamma,
        "warmup_epochs": spec.warmup_epochs,
    }
    step_module.train()
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    zero = torch.zeros((), device=device, dtype=torch.float64)
    # Device-side sums: no host sync per step.
    loss_sum, correct, labeled, grad_norm_sum = (zero.clone() for _ in range(4))
    log_sums: dict[str, torch.Tensor] = {}
    log_samples: dict[str, int] = {}
    samples = steps = 0
    started = time.perf_counter()
    desc = f"epoch {epoch + 1}/{spec.epochs}"
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None if show else True)
    for batch in bar:
        factor = lr_factor(epoch * steps_per_epoch + steps, **schedule)
        if factor is not None:  # None: "plateau" sets the lr between epochs
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        batch = _to_device(batch, device, video_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = step_module(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out.loss).backward()
        else:
            out.loss.backward()
        if spec.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm_sum += torch.nn.utils.clip_grad_norm_(trainable, spec.grad_clip).double()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

        size = len(batch["video"])
        samples += size
        steps += 1
        loss_sum += out.loss.detach().double() * size
        label = batch.get("label")
        if out.logits is not None and label is not None and len(out.logits) == len(label):
            mask = label >= 0
            labeled += mask.sum()
            correct += ((out.logits.detach().argmax(dim=1) == label) & mask).sum()
        for name, value in out.logs.items():
            value = torch.as_tensor(value, device=device).detach().double()
            log_sums[name] = log_sums.get(name, zero) + value * size
            log_samples[name] = log_samples.get(name, 0) + size
        if show and (steps % 10 == 0 or steps == 1):
            # .item() syncs the device: only every tenth step, for the bar.
            postfix = {"loss": f"{loss_sum.item() / samples:.4f}"}
            if labeled.item():
                postfix["acc"] = f"{correct.item() / labeled.item():.3f}"
            postfix["clips/s"] = f"{samples / (time.perf_counter() - started):.0f}"
            bar.set_postfix(postfix)
    if steps == 0:
        raise ValueError("the train loader gave no batches")
    return {
        "samples": samples,
        "labeled": labeled.item(),
        "steps": steps,
        "loss_sum": loss_sum.item(),
        "correct": correct.item(),
        "grad_norm_sum": grad_norm_sum.item(),
        "log_sums": {name: value.item() for name, value in log_sums.items()},
        "log_samples": log_samples,
        "seconds": time.perf_counter() - started,
        "lr": optimizer.param_groups[0]["lr"],
    }


def _epoch_record(epoch: int, per_rank: list[dict], clipped: bool) -> dict:
    """Sum the ranks' epoch sums into one history record ("lr": its last step's)."""
    samples = sum(r["samples"] for r in per_rank)
    labeled = sum(r["labeled"] for r in per_rank)
    steps = sum(r["steps"] for r in per_rank)
    record = {
        "epoch": epoch,
        "lr": per_rank[0]["lr"],
        "train_loss": sum(r["loss_sum"] for r in per_rank) / samples,
    }
    if labeled:
        record["train_top1"] = sum(r["correct"] for r in per_rank) / labeled
    if clipped:
        record["train_grad_norm"] = sum(r["grad_norm_sum"] for r in per_rank) / steps
    for name in sorted({n for r in per_rank for n in r["log_sums"]}):
        total = sum(r["log_sums"].get(name, 0.0) for r in per_rank)
        record[f"train_{name}"] = total / sum(r["log_samples"].get(name, 0) for r in per_rank)
    seconds = max(r["seconds"] for r in per_rank)
    record["epoch_seconds"] = seconds
    record["clips_per_s"] = samples / seconds
    return record


def _monitored(record: dict, validating: bool) -> tuple[str, float, str] | None:
    """(name, value, mode) of the metric that picks the best epoch and drives "plateau": the
    validation top-1 (video-level when available) when validating, else the training loss. None on
    an epoch without validation in a validating run, so that the two are never mixed."""
    if not validating:
        return "train_loss", record["train_loss"], "min"
    for name in ("val_video_top1", "val_clip_top1"):
        if name in record:
            return name, record[name], "max"
    return None


def _scalars(metrics: dict) -> dict:
    return {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------- resume decisions


def _stored_key(ckpt_dir: Path) -> str | None:
    try:
        return json.loads((ckpt_dir / "key.json").read_text()).get("key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _resume_point(ckpt_dir: Path, key: str) -> Path | None:
    """last.pt if it belongs to this key; None to start fresh."""
    last = ckpt_dir / "last.pt"
    return last if last.is_file() and _stored_key(ckpt_dir) == key else None


def _start_fresh(run_dir: Path, ckpt_dir: Path, key: str, params: dict) -> None:
    """Clear the checkpoint folder (another run's checkpoints, or leftovers of a kill before the
    first checkpoint) and old outputs, then record this run's key."""
    if ckpt_dir.exists():
        if _stored_key(ckpt_dir) not in (None, key) or (ckpt_dir / "last.pt").exists():
            log.warning(
                "%s holds checkpoints of other params (run key is now %s…); starting fresh and "
                "removing them",
                ckpt_dir,
                key[:12],
            )
        shutil.rmtree(ckpt_dir)
    for name in ("model.pt", "metrics.json", "history.json"):
        (run_dir / name).unlink(missing_ok=True)
    write_json_atomic(
        ckpt_dir / "key.json", {"key": key, "params": json.loads(canonical_json(params))}
    )


# ---------------------------------------------------------------- fit


def fit(
    method: Method,
    train_loader,
    *,
    val_loader=None,
    run_dir: str | os.PathLike,
    params: dict,
    spec: TrainSpec,
) -> dict:
    """Train `method` per `spec`, checkpointing every epoch into run_dir; returns final metrics.

    Determinism: seeds torch/numpy/python with spec.seed (+ rank) at a fresh start (build the
    method after `seed_everything(spec.seed)` so its initial weights are reproducible too), reseeds
    the train loader's generator per epoch, and calls `set_epoch(epoch)` on the loader's dataset
    and samplers where defined. The same params and seed give an identical metrics.json on CPU.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    rank, world, local_rank = distributed_env()
    if world > 1 and not _shards_by_rank(train_loader, world):
        raise ValueError(
            f"WORLD_SIZE={world} but the train loader does not shard by rank: build it with "
            "pipeline.train.make_loader"
        )
    if world > 1 and val_loader is not None and _shards_by_rank(val_loader, world):
        raise ValueError(
            "the val loader shards by rank, but fit evaluates the whole set on every rank (so "
            "all ranks take the same decisions): build it with make_loader(distributed=False)"
        )
    device = resolve_device(spec.device, local_rank)
    created_group = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created_group = True
    try:
        return _fit(
            method, train_loader, val_loader, run_dir, ckpt_dir, params, spec, rank, world, device
        )
    finally:
        if created_group:
            dist.destroy_process_group()


def _fit(method, train_loader, val_loader, run_dir, ckpt_dir, params, spec, rank, world, device):
    _configure_backends(spec)
    main = rank == 0
    key = run_key(params, spec)
    resume_from = _agree_on_resume(run_dir, ckpt_dir, key, params, main, world)
    if world > 1:
        method = synchronise_batch_norm(method, device)
    method.to(device)
    video_format = _memory_format(method, spec, device)
    optimizer = _build_optimizer([p for p in method.parameters() if p.requires_grad], spec)
    plateau = _build_plateau(optimizer, spec, validating=val_loader is not None)
    scaler = torch.amp.GradScaler(device.type) if spec.amp == "fp16" else None
    state = {"history": [], "best": None, "last_val": None, "epoch": -1, "rng": None}
    if resume_from is not None:
        state = _resume(resume_from, key, method, optimizer, plateau, scaler, main)
    step_module = method
    if world > 1:
        step_module = DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.ddp_find_unused_parameters,
        )
    # Open the log before seeding: DVCLive draws a random experiment name.
    live = _open_live(run_dir, state["history"]) if main else None
    _seed_ranks(spec, rank, world, state)
    history, best, last_val = state["history"], state["best"], state["last_val"]
    for epoch in range(state["epoch"] + 1, spec.epochs):
        start_epoch(train_loader, spec.seed, epoch)
        sums = _train_one_epoch(
            step_module,
            train_loader,
            optimizer,
            scaler,
            epoch=epoch,
            spec=spec,
            device=device,
            video_format=video_format,
            show=main,
        )
        record = _epoch_record(epoch, _gather(sums, world), spec.grad_clip is not None)
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(
                f"training loss is {record['train_loss']} in epoch {epoch}; "
                f"the last good state is {ckpt_dir / 'last.pt'}"
            )
        if val_loader is not None and (
            (epoch + 1) % spec.val_every == 0 or epoch + 1 == spec.epochs
        ):
            last_val = evaluate(
                method.model, val_loader, device=device, amp=spec.amp, progress=main
            )
            record |= {f"val_{k}": v for k, v in _scalars(last_val).items()}
            method.on_validation(epoch, last_val)
        best = _track_best(best, record, epoch, plateau, spec, validating=val_loader is not None)
        history.append(record)
        rng_state = capture_rng_state()
        rng_states = _gather(rng_state, world)  # every rank takes part in the all-gather
        if main:
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "key": key,
                "params": json.loads(canonical_json(params)),
                "epoch": epoch,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "plateau": plateau.state_dict() if plateau is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states,
                "best": best,
                "history": history,
                "last_val": last_val,
                "world_size": world,
            }
            _save_epoch(checkpoint, run_dir, ckpt_dir, live, record, spec)
        # Writing and logging may draw random numbers (DVCLive does); the next epoch starts from
        # exactly the checkpointed state, as a resumed run does.
        restore_rng_state(rng_state)

    metrics = _final_metrics(key, spec, device, world, train_loader, history, last_val, best)
    if main:
        _write_model(method, key, history, run_dir)
        write_json_atomic(run_dir / "metrics.json", metrics)
        live.end()
        # Checkpoints serve only an unfinished run: a stage rerun after this one finished (forced,
        # or its outputs deleted by a tool) trains afresh instead of "resuming" into old outputs.
        shutil.rmtree(ckpt_dir)
    if world > 1:
        dist.barrier()  # no rank leaves before rank 0 has written the outputs
    return metrics


def _configure_backends(spec: TrainSpec) -> None:
    torch.set_num_threads(spec.threads)
    if spec.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not spec.deterministic
    torch.backends.cudnn.deterministic = spec.deterministic


def _agree_on_resume(run_dir, ckpt_dir, key, params, main: bool, world: int) -> Path | None:
    """The checkpoint to resume from (None: start fresh, clearing the folder). Every rank reads
    the decision before rank 0 changes any file."""
    resume_from = _resume_point(ckpt_dir, key)
    if world > 1:
        dist.barrier()
    if main and resume_from is None:
        _start_fresh(run_dir, ckpt_dir, key, params)
    if world > 1:
        dist.barrier()
    return resume_from


def _memory_format(method, spec: TrainSpec, device: torch.device):
    """channels_last_3d for the videos when asked for (weights converted here), else None. On CPU
    too: oneDNN's channels-last 3D convolutions train the tiny students 1.6x faster (48 px clips,
    `python -m pipeline bench train`)."""
    if not spec.channels_last:
        return None
    _to_channels_last(method)
    if getattr(method.model, "memory_format", torch.channels_last_3d) == torch.channels_last_3d:
        return torch.channels_last_3d
    return None


def _build_plateau(optimizer, spec: TrainSpec, validating: bool):
    if spec.schedule != "plateau":
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max" if validating else "min",  # see _monitored
        factor=spec.plateau_factor,
        patience=spec.plateau_patience,
    )


def _resume(path: Path, key: str, method, optimizer, plateau, scaler, main: bool) -> dict:
    """Load a run's last checkpoint into the method and optimisation state; returns the loop's
    state (history, best, last_val, epoch done, rng states)."""
    ckpt = load_checkpoint(path)  # on CPU: RNG states must stay CPU tensors
    if ckpt.get("key") != key or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: its run key or format does not match key.json beside it")
    method.load_state_dict(ckpt["method"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if plateau is not None:
        plateau.load_state_dict(ckpt["plateau"])
    if scaler is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if main:
        log.info("%s: resuming after epoch %d", path, ckpt["epoch"])
    return {
        "history": ckpt["history"],
        "best": ckpt["best"],
        "last_val": ckpt["last_val"],
        "epoch": ckpt["epoch"],
        "rng": ckpt["rng"],
    }


def _seed_ranks(spec: TrainSpec, rank: int, world: int, state: dict) -> None:
    """Fresh runs seed from the spec; resumed runs restore each rank's checkpointed RNG."""
    if state["rng"] is None:
        seed_everything(spec.seed + rank)
    elif len(state["rng"]) == world:
        restore_rng_state(state["rng"][rank])
    else:
        log.warning(
            "checkpoint was written by %d ranks, now %d: reseeding", len(state["rng"]), world
        )
        seed_everything(derived_seed(spec.seed, state["epoch"] + 1, rank))


def _track_best(best, record: dict, epoch: int, plateau, spec: TrainSpec, validating: bool):
    """Step "plateau" on the monitored metric and return the best epoch so far."""
    monitored = _monitored(record, validating)
    if monitored is None:
        return best
    name, value, mode = monitored
    if plateau is not None and epoch >= spec.warmup_epochs:
        plateau.step(value)
    if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
        return {"metric": name, "value": value, "epoch": epoch}
    return best


def _save_epoch(checkpoint: dict, run_dir: Path, ckpt_dir: Path, live, record, spec) -> None:
    save_checkpoint(checkpoint, ckpt_dir / "last.pt")
    write_json_atomic(run_dir / "history.json", checkpoint["history"])
    _log_epoch(live, record)
    log.info("epoch %d/%d: %s", record["epoch"] + 1, spec.epochs, _summary(record))


def _final_metrics(key, spec, device, world, train_loader, history, last_val, best) -> dict:
    batch_size = _batch_size(train_loader)
    return {
        "run_key": key,
        "epochs": spec.epochs,
        "seed": spec.seed,
        "threads": spec.threads,
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "world_size": world,
        "batch_size": batch_size,
        "global_batch_size": batch_size * world if batch_size else None,
        "amp": spec.amp,
        "channels_last": spec.channels_last,
        "deterministic": spec.deterministic,
        "torch_version": torch.__version__,
        "last_epoch": {k: v for k, v in history[-1].items() if k not in TIMING_FIELDS},
        "val": last_val,
        "best": best,
    }


def _write_model(method, key: str, history: list[dict], run_dir: Path) -> None:
    meta = {
        "run_key": key,
        "epoch": history[-1]["epoch"],
        "model_class": type(method.model).__name__,
        "method_class": type(method).__name__,
        "num_parameters": sum(p.numel() for p in method.model.parameters()),
    }
    save_checkpoint({"model": method.model.state_dict(), "meta": meta}, run_dir / "model.pt")


def _summary(record: dict) -> str:
    shown = ("lr", "train_loss", "train_top1", "val_clip_top1", "val_video_top1", "clips_per_s")
    return " ".join(f"{k}={record[k]:.4g}" for k in shown if k in record)


def _open_live(run_dir: Path, history: list[dict]):
    """DVCLive logger for this run; on resume the kept history is replayed into a clean log, so
    the log matches the checkpoint even if the kill fell between the two writes."""
    from dvclive import Live  # imported here: it pulls in dvc, which only rank 0 needs

    class RunLive(Live):
        """DVCLive without repository discovery. Stock DVCLive opens the DVC repo around the
        working directory: that raises in a git repo without commits and runs `dvc init` in a
        git repo without DVC. The run's outputs are tracked by the generated dvc.yaml, so the
        log needs nothing from the repo."""

        def _init_dvc(self):
            self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None

    # dvcyaml=None / save_dvc_exp=False: DVCLive never edits the project's generated dvc.yaml.
    live = RunLive(dir=str(run_dir / "dvclive"), save_dvc_exp=False, dvcyaml=None, report=None)
    for record in history:
        _log_epoch(live, record)
    return live


def _log_epoch(live, record: dict) -> None:
    live.step = record["epoch"]
    for name, value in record.items():
        if name != "epoch":
            # "train_loss" -> "train/loss": DVCLive groups plots by folder.
            for split in ("train", "val"):
                if name.startswith(split + "_"):
                    name = f"{split}/{name.removeprefix(split + '_')}"
            live.log_metric(name, value)
    live.next_step()
