"""`python -m pipeline bench gpu`: what a GPU changes, each figure beside its CPU alternative.

One prepared check, a few minutes on one GPU. Everything runs at real size, on synthetic data (no
shards, teachers or caches needed): R3D-18 (torchvision's: width 64, layers 2-2-2-2) on
16 x 112 x 112 clips, ResNet-50 teachers (random weights) at 224 px, JPEG frames of 128 x 170
(UCF101 at ingest.short_side 128). One row per check; the CPU column times the same work on the
CPU (a few steps of one clip), the GPU column on the GPU (batches of 32 clips), and the note
compares each side with its alternative on the same device:
- training steps in fp32, bf16 autocast, fp16 autocast + GradScaler, and channels-last 3D (fp32);
- host -> device copies of a uint8 batch from pinned memory (non_blocking) vs pageable memory;
- the teacher feature cache built on each device (the features stage's own per-shard writer);
- JPEG shard decoding: the loader's CPU path vs torchvision's nvJPEG decoder on the GPU;
- DistributedDataParallel in one process (gloo on CPU, NCCL on the GPU) vs the plain model;
- DTG-Net pre-training (four teachers' guidance from the cache).
Without CUDA the GPU column says "skipped: no CUDA device" and the bench still exits 0. On the GPU a
failing check prints "failed" with its error and the others still run; the bench then exits 1.
"""

import itertools
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.io import ImageReadMode, decode_jpeg
from tqdm.auto import tqdm

from pipeline.dag import ALL_TEACHERS
from pipeline.data.ingest import _append_jpeg, _create_frames, _jpeg
from pipeline.data.shards import _read_jpeg
from pipeline.methods.dtg import DTG
from pipeline.models import build_video_model, resnet_2d
from pipeline.teachers import default_preprocess
from pipeline.teachers.base import FrozenTeacher
from pipeline.teachers.features import _output_shapes, _write_feat_file
from pipeline.train import _to_device

STUDENT = {"name": "r3d_18", "width": 64, "layers": (2, 2, 2, 2)}  # torchvision's R3D-18
FRAMES, CROP = 16, 112  # a training clip at real size (README "Real data")
FRAME_SIZE = (128, 170)  # a stored UCF101 frame at ingest.short_side 128
JPEG_QUALITY = 90  # params.yaml ingest.jpeg_quality
DISTINCT_FRAMES = 64  # the JPEG shard repeats this many distinct frames
NUM_CLASSES = 101
TEACHER_DIM = 2048  # a ResNet-50's embedding
DTG_ARGS = {"tau": 0.07, "queue_size": 512, "proj_hidden": 0}  # params.yaml dtg
CPU_FP16 = "not run"
NO_COPY = "- (no copy)"
CPU_FP16_NOTE = "CPU: no fast fp16 conv3d (one step of 2 clips took 270 s, 100x fp32, here)"
NO_CUDA = "skipped: no CUDA device"
AGREEMENT_LEVELS = 8.0  # mean |GPU - CPU decode| above this means the GPU frames are corrupt


@dataclass(frozen=True)
class Budget:
    """How much one device does per check: `clips` per training step, `frames` per teacher batch
    and per JPEG decode call, `steps` timed calls after `warmup` untimed ones."""

    device: torch.device
    clips: int
    frames: int
    steps: int
    warmup: int


def budgets(steps: int, cpu_steps: int) -> dict[str, Budget | None]:
    """The CPU's budget and the GPU's (None without CUDA)."""
    cpu = Budget(torch.device("cpu"), clips=1, frames=8, steps=cpu_steps, warmup=1)
    if not torch.cuda.is_available():
        return {"cpu": cpu, "cuda": None}
    cuda = torch.device("cuda", torch.cuda.current_device())
    return {"cpu": cpu, "cuda": Budget(cuda, clips=32, frames=256, steps=steps, warmup=3)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(work: Callable[[], float], budget: Budget) -> float:
    """Amount per second of `budget.steps` calls of `work` (each returns the amount it did) after
    `budget.warmup` untimed ones; the device is synchronised before the clock starts and stops."""
    for _ in range(budget.warmup):
        work()
    synchronize(budget.device)
    started = time.perf_counter()
    amount = sum(work() for _ in range(budget.steps))
    synchronize(budget.device)
    return amount / (time.perf_counter() - started)


def sgd_step(
    module: torch.nn.Module, loss: Callable[[], torch.Tensor], amp: torch.dtype | None, clips: int
) -> Callable[[], int]:
    """One training step of `clips` clips (it returns that count) as pipeline.train.fit takes it:
    `loss()` under autocast to `amp` (None: fp32), backward, SGD update; fp16 via a GradScaler."""
    device_type = next(module.parameters()).device.type
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device_type) if amp == torch.float16 else None

    def step() -> int:
        with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            value.backward()
            optimizer.step()
        else:
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
        return clips

    return step


def train_clips_per_second(
    budget: Budget,
    *,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    ddp: bool = False,
) -> float:
    """Supervised training steps of R3D-18 on one batch of clips; `ddp` wraps the model in
    DistributedDataParallel (a process group must exist)."""
    device = budget.device
    torch.manual_seed(0)
    model = build_video_model(num_classes=NUM_CLASSES, **STUDENT).to(device)
    clips = torch.randn(budget.clips, 3, FRAMES, CROP, CROP, device=device)
    labels = torch.randint(0, NUM_CLASSES, (budget.clips,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    if ddp:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return rate(
        sgd_step(model, lambda: F.cross_entropy(model(clips), labels), amp, budget.clips), budget
    )


@contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A world of one process on a free localhost port: NCCL on CUDA, gloo on CPU."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp_clips_per_second(budget: Budget) -> float:
    with single_process_group(budget.device):
        return train_clips_per_second(budget, ddp=True)


def pinned(batch: dict) -> dict:
    """The batch in page-locked memory, as the loader's pin-memory thread gives it on CUDA."""
    return {
        name: {k: v.pin_memory() for k, v in value.items()}
        if isinstance(value, dict)
        else value.pin_memory()
        for name, value in batch.items()
    }


def dtg_clips_per_second(
    budget: Budget,
    teachers: tuple[str, ...] = ALL_TEACHERS,
    embed: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> float:
    """DTG-Net pre-training steps of R3D-18 (fp32) on uint8 batches in host memory, moved and
    normalised as fit does. The guidance comes from the cache (random TEACHER_DIM-d embeddings per
    teacher: their values do not change a step's cost), or with `embed` from FRAMES guidance frames
    per clip (uint8, FRAME_SIZE) that `embed` turns into each teacher's embeddings in the step."""
    device = budget.device
    torch.manual_seed(0)
    student = build_video_model(num_classes=0, **STUDENT)
    feature_dims = dict.fromkeys(teachers, TEACHER_DIM)
    method = DTG(student, teachers=feature_dims, **DTG_ARGS).to(device)
    generator = torch.Generator().manual_seed(0)

    def host_batch() -> dict:
        clips = budget.clips
        if embed is None:
            guidance = {
                name: torch.randn(clips, TEACHER_DIM, generator=generator) for name in teachers
            }
        else:
            shape = (clips, FRAMES, *FRAME_SIZE, 3)
            guidance = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        video = torch.randint(
            0, 256, (clips, 3, FRAMES, CROP, CROP), dtype=torch.uint8, generator=generator
        )
        batch = {"video": video, "index": torch.arange(clips), "guidance": guidance}
        return pinned(batch) if device.type == "cuda" else batch

    batches = itertools.cycle([host_batch() for _ in range(2)])

    def loss() -> torch.Tensor:
        batch = _to_device(next(batches), device, None)
        if embed is not None:
            batch["guidance"] = embed(batch["guidance"])
        return method(batch).loss

    return rate(sgd_step(method, loss, None, budget.clips), budget)


def resnet50_teacher(name: str) -> FrozenTeacher:
    """A frozen ResNet-50 (torchvision's architecture and initialisation, random weights) with
    teacher `name`'s preprocessing at 224 px."""
    network = resnet_2d("resnet50", num_classes=0)
    return FrozenTeacher(
        name, network, default_preprocess(name, 224), feature_dim=network.feature_dim
    )


def write_jpeg_shard(path: Path, count: int) -> None:
    """A shard file of `count` JPEG frames in ingest's layout (its writer and encoder): smooth
    random images with per-pixel noise, DISTINCT_FRAMES distinct ones repeated."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(DISTINCT_FRAMES, 3, 6, 8, generator=generator) * 255
    smooth = F.interpolate(coarse, size=FRAME_SIZE, mode="bilinear", align_corners=False)
    noisy = smooth + 6 * torch.randn(smooth.shape, generator=generator)
    images = noisy.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    files = [_jpeg(image, JPEG_QUALITY) for image in images]
    with h5py.File(path, "w") as file:
        frames = _create_frames(file, "jpeg", None)
        _append_jpeg(frames, [files[k % len(files)] for k in range(count)])


def frame_batches(budget: Budget) -> Iterator[np.ndarray]:
    """Shard rows in batches of budget.frames, over the first budget.steps batches, cycled."""
    for batch in itertools.cycle(range(budget.steps)):
        yield np.arange(batch * budget.frames, (batch + 1) * budget.frames)


def cache_frames_per_second(frames: h5py.Dataset, budget: Budget) -> float:
    """Frames/s of the features stage's work on budget.frames x budget.steps JPEG frames: read and
    decode on the CPU, the teacher on the device, float16 outputs written to a feat file
    (pipeline.teachers.features._write_feat_file, with the teacher laid out as
    build_feature_cache lays it out)."""
    device = budget.device
    teacher = resnet50_teacher("imagenet").to(device)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=teacher.network.memory_format)
    rows = budget.frames * budget.steps
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        shapes = _output_shapes(teacher, device)
        first = torch.from_numpy(_read_jpeg(frames, np.arange(budget.frames), None))
        for _ in range(budget.warmup):
            teacher(first.to(device))
        synchronize(device)
        started = time.perf_counter()
        with tqdm(total=rows, disable=True) as bar:
            _write_feat_file(
                Path(tmp) / "feat.h5",
                teacher=teacher,
                shapes=shapes,
                frames=frames,
                codec="jpeg",
                runs=[range(rows)],
                rows=rows,
                attrs={},
                batch_size=budget.frames,
                device=device,
                bar=bar,
            )
        # _write_feat_file ends by copying the last outputs to the host: the device is done.
        return rows / (time.perf_counter() - started)


def decode_jpeg_rows(frames: h5py.Dataset, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Consecutive shard rows decoded: on the CPU by the loader's path (ShardStore's reader,
    (T, H, W, 3)); on CUDA read the same way and decoded in one nvJPEG batch, (T, 3, H, W)."""
    if device.type == "cpu":
        return torch.from_numpy(_read_jpeg(frames, rows, None))
    encoded = frames[int(rows[0]) : int(rows[-1]) + 1]
    # nvJPEG may write its outputs before work queued on the caller's stream has read the memory
    # they reuse (pytorch/vision#9606): drain the stream first.
    torch.cuda.synchronize(device)
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (for torchcodec)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        decoded = decode_jpeg(
            [torch.from_numpy(file) for file in encoded], mode=ImageReadMode.RGB, device=device
        )
    return torch.stack(decoded)


def jpeg_frames_per_second(frames: h5py.Dataset, budget: Budget) -> float:
    """Decoded frames/s; the CPU side in one thread, as each loader worker decodes."""
    batches = frame_batches(budget)
    threads = torch.get_num_threads()
    if budget.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return rate(lambda: len(decode_jpeg_rows(frames, next(batches), budget.device)), budget)
    finally:
        torch.set_num_threads(threads)


def jpeg_difference(frames: h5py.Dataset, budget: Budget) -> float:
    """Mean |GPU - CPU| in levels over one batch of decoded frames (the decoders differ slightly;
    corrupt frames differ a lot)."""
    rows = np.arange(budget.frames)
    on_cpu = decode_jpeg_rows(frames, rows, torch.device("cpu")).float()
    on_gpu = decode_jpeg_rows(frames, rows, budget.device).permute(0, 2, 3, 1).float().cpu()
    return float((on_gpu - on_cpu).abs().mean())


def copy_gb_per_second(budget: Budget, pin: bool) -> float:
    """Host -> device copies of one uint8 training batch, from pinned memory with non_blocking
    (pinned once, as the loader's pin-memory thread does beside training) or pageable memory."""
    host = torch.randint(0, 256, (budget.clips, 3, FRAMES, CROP, CROP), dtype=torch.uint8)
    if pin:
        host = host.pin_memory()

    def copy() -> int:
        host.to(budget.device, non_blocking=pin)
        return host.numel()

    return rate(copy, budget) / 1e9


@dataclass
class Row:
    """One check: its CPU and GPU figures (a number in `unit`, or why there is none)."""

    check: str
    unit: str
    cpu: float | str
    gpu: float | str
    note: str = ""


DEVICE_NAMES = {"cpu": "CPU", "cuda": "GPU"}


def versus(alternative: str, figures: Mapping, base: Mapping) -> str:
    """'vs <alternative>: CPU 1.20x, GPU 2.10x' over the devices where both sides are figures."""
    ratios = [
        f"{name} {figures[device] / base[device]:.2f}x"
        for device, name in DEVICE_NAMES.items()
        if isinstance(figures[device], float) and isinstance(base[device], float)
    ]
    return f"vs {alternative}: {', '.join(ratios)}" if ratios else ""


class Checks:
    """Runs measurements on both devices; a failing GPU measurement is recorded, not raised."""

    def __init__(self, budget: Mapping[str, Budget | None]):
        self.budget = budget
        self.failures: list[str] = []

    def both(self, measure: Callable[[Budget], float], cpu: str | None = None) -> dict:
        """{"cpu": measure(CPU budget) (or `cpu`, why it is not run), "cuda": measure(GPU
        budget), NO_CUDA or "failed"}, plus "error" (the message) when the GPU side failed."""
        figures = {"cpu": measure(self.budget["cpu"]) if cpu is None else cpu}
        gpu = self.budget["cuda"]
        if gpu is None:
            return figures | {"cuda": NO_CUDA}
        try:
            return figures | {"cuda": measure(gpu)}
        except Exception as err:  # noqa: BLE001 - reported in the table; the other checks run
            message = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            self.failures.append(message)
            return figures | {"cuda": "failed", "error": f"GPU failed: {message}"}


def row(check: str, unit: str, figures: Mapping, *notes: str | None) -> Row:
    """The Row of Checks.both's `figures`; its note: the GPU's error (if any), then `notes`."""
    note = "; ".join(filter(None, [figures.get("error"), *notes]))
    return Row(check, unit, figures["cpu"], figures["cuda"], note)


def check_training(checks: Checks) -> list[Row]:
    """fp32, bf16 autocast, fp16 autocast + GradScaler, channels-last 3D (fp32)."""
    fp32 = checks.both(train_clips_per_second)
    bf16 = checks.both(lambda b: train_clips_per_second(b, amp=torch.bfloat16))
    fp16 = checks.both(lambda b: train_clips_per_second(b, amp=torch.float16), cpu=CPU_FP16)
    last = checks.both(lambda b: train_clips_per_second(b, channels_last=True))
    return [
        row("train R3D-18: fp32", "clips/s", fp32),
        row("train R3D-18: bf16 autocast", "clips/s", bf16, versus("fp32", bf16, fp32)),
        row("train R3D-18: fp16 autocast + GradScaler", "clips/s", fp16,
            versus("fp32", fp16, fp32), CPU_FP16_NOTE),
        row("train R3D-18: channels-last 3D (fp32)", "clips/s", last,
            versus("contiguous", last, fp32)),
    ]  # fmt: skip


def check_copies(checks: Checks) -> Row:
    pageable = checks.both(lambda b: copy_gb_per_second(b, pin=False), cpu=NO_COPY)
    pinned_ = checks.both(lambda b: copy_gb_per_second(b, pin=True), cpu=NO_COPY)
    check = "copy a uint8 batch to the GPU: pinned, non_blocking"
    return row(check, "GB/s", pinned_, pageable.get("error"), versus("pageable", pinned_, pageable))


def check_feature_cache(checks: Checks, frames: h5py.Dataset) -> Row:
    figures = checks.both(lambda b: cache_frames_per_second(frames, b))
    check = "feature cache build: ResNet-50 teacher, 224 px"
    return row(check, "frames/s", figures, "JPEG decoded on the CPU, float16 feat file written")


def check_jpeg_decode(checks: Checks, frames: h5py.Dataset) -> Row:
    figures = checks.both(lambda b: jpeg_frames_per_second(frames, b))
    difference = checks.both(lambda b: jpeg_difference(frames, b), cpu="-")
    agreement = None
    if isinstance(difference["cuda"], float):
        verdict = "" if difference["cuda"] <= AGREEMENT_LEVELS else ": CORRUPT"
        agreement = f"GPU frames differ from the CPU's by {difference['cuda']:.2f} levels{verdict}"
    check = f"JPEG shard decode, {FRAME_SIZE[0]}x{FRAME_SIZE[1]}: CPU vs nvJPEG"
    return row(check, "frames/s", figures, "CPU: one thread, as a loader worker",
               difference.get("error"), agreement)  # fmt: skip


def check_ddp(checks: Checks, plain: Mapping) -> Row:
    figures = checks.both(ddp_clips_per_second)
    check = "train R3D-18: DDP, 1 process (gloo / NCCL)"
    return row(check, "clips/s", figures, versus("plain model", figures, plain))


def check_dtg(checks: Checks) -> Row:
    figures = checks.both(dtg_clips_per_second)
    note = f"fp32; {len(ALL_TEACHERS)} teachers' guidance from the cache"
    return row("DTG-Net pre-training: R3D-18 student", "clips/s", figures, note)


WIDTHS = (51, 20, 24, 9)


def format_row(row: Row) -> str:
    def figure(value: float | str) -> str:
        return f"{value:,.2f} {row.unit}" if isinstance(value, float) else value

    both = isinstance(row.cpu, float) and isinstance(row.gpu, float)
    ratio = f"{row.gpu / row.cpu:,.1f}x" if both else "-"
    cells = (row.check, figure(row.cpu), figure(row.gpu), ratio)
    return (
        "  " + "  ".join(f"{c:<{w}}" for c, w in zip(cells, WIDTHS, strict=True)) + "  " + row.note
    )


def bench_gpu(*, steps: int, cpu_steps: int, threads: int) -> list[Row]:
    """Run every check, printing each row as it is measured; return the rows. RuntimeError after
    the table when a GPU check failed."""
    budget = budgets(steps, cpu_steps)
    cpu, gpu = budget["cpu"], budget["cuda"]
    started = time.perf_counter()

    def describe(name: str, side: Budget) -> str:
        return (
            f"{name}: batch {side.clips} clips / {side.frames} frames (teacher, JPEG decode), "
            f"{side.steps} timed steps after {side.warmup} warm-up"
        )

    gpu_line = describe(torch.cuda.get_device_name(gpu.device), gpu) if gpu else f"GPU: {NO_CUDA}"
    print(
        f"bench gpu: R3D-18 on {FRAMES}x{CROP}x{CROP} clips, ResNet-50 teachers at 224 px, JPEG "
        f"frames {FRAME_SIZE[0]}x{FRAME_SIZE[1]}; synthetic data; {threads} CPU threads\n"
        f"  {describe('CPU', cpu)}\n  {gpu_line}"
    )
    header = ("check", "CPU", "GPU", "GPU/CPU")
    print("  " + "  ".join(f"{c:<{w}}" for c, w in zip(header, WIDTHS, strict=True)) + "  note")
    checks = Checks(budget)
    rows = []

    def add(*new: Row) -> None:
        for row in new:
            print(format_row(row), flush=True)
            rows.append(row)

    threads_before, benchmark_before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True  # as fit sets it (spec.deterministic off)
    try:
        if gpu is not None:
            torch.cuda.set_device(gpu.device)
        training = check_training(checks)
        add(*training)
        fp32 = {"cpu": training[0].cpu, "cuda": training[0].gpu}
        add(check_copies(checks))
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            shard = Path(tmp) / "shard-00000.h5"
            write_jpeg_shard(shard, max(b.frames * b.steps for b in budget.values() if b))
            with h5py.File(shard, "r") as file:
                add(check_feature_cache(checks, file["frames"]))
                add(check_jpeg_decode(checks, file["frames"]))
        add(check_ddp(checks, fp32))
        add(check_dtg(checks))
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.cudnn.benchmark = benchmark_before
    print(f"  took {time.perf_counter() - started:.0f} s")
    if checks.failures:
        raise RuntimeError(f"{len(checks.failures)} GPU checks failed: {checks.failures}")
    return rows
