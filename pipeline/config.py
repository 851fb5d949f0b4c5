"""The schema of params.yaml: the one place that validates configuration.

Every reader (the Snakefile, each stage command, the dvc.yaml generator) calls `load_params`, so a
bad value fails the same way everywhere: one line naming the dotted key, exit code 2, before work.
"""

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError

PARAMS_FILE = Path("params.yaml")

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; frozen so stages cannot mutate shared params.
    model_config = ConfigDict(extra="forbid", frozen=True)


class VideoDataset(Section):
    """Where a video dataset's raw files live and how they are laid out."""

    format: Literal["ucf101", "hmdb51"]
    raw: str  # folder in the dataset's official layout (see README, "Real data")
    split: Annotated[int, Field(ge=1, le=3)] = 1  # official split used for train/test


class RenderParams(Section):
    """What both synthetic worlds draw alike: frames, actors, camera and noise (the renderer's
    knobs, pipeline/data/render.py)."""

    seed: NonNegInt = 0
    frame_height: Annotated[int, Field(ge=16, le=1024, multiple_of=2)] = 48
    frame_width: Annotated[int, Field(ge=16, le=1024, multiple_of=2)] = 64
    num_frames: Annotated[int, Field(ge=8, le=1000)] = 32
    fps: Annotated[int, Field(ge=1, le=120)] = 25
    classes: tuple[str, ...] | None = None  # None: every action of the world
    clips_per_group: Annotated[int, Field(ge=1, le=99)] = 5
    noise_std: Annotated[float, Field(ge=0.0, le=128.0)] = 6.0
    camera_jitter_px: Annotated[float, Field(ge=0.0)] = 0.7
    camera_pan: Annotated[float, Field(ge=0.0)] = 0.2
    zoom_range: Annotated[float, Field(ge=0.0)] = 0.2
    speed_range: Annotated[float, Field(ge=1.0)] = 1.5
    amplitude_var: Fraction = 0.25
    appearance_var: Fraction = 0.5  # actors' colours: 0 one outfit for all, 1 fully random
    person_height: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75
    body_size_var: Fraction = 0.15
    brightness_var: Fraction = 0.2
    scene_correlation: Fraction = 0.3
    object_correlation: Fraction = 0.5
    no_object_prob: Fraction = 0.2
    texture_contrast: Fraction = 1.0  # scene texture strength: 0 flat two-colour scenes


class SynthParams(RenderParams):
    """The embedded synthetic action world; mirrors pipeline.data.synth.WorldSpec (which also
    checks cross-field rules, reported under `synth`)."""

    groups_per_class: Annotated[int, Field(ge=2, le=99)] = 25
    test_groups: PosInt = 7
    crf: Annotated[int, Field(ge=0, le=51)] = 20
    write_video_masks: bool = False
    image_size: Annotated[int, Field(ge=16, le=512)] = 48
    objects_train_per_class: PosInt = 400
    objects_val_per_class: PosInt = 50
    scenes_train_per_class: PosInt = 300
    scenes_val_per_class: PosInt = 50
    scene_person_prob: Fraction = 0.5
    bu101_per_class: PosInt = 120
    stanford40_train_per_class: PosInt = 40
    stanford40_test_per_class: PosInt = 20
    parsing_train: PosInt = 1200
    parsing_val: PosInt = 200


class SynthHMDBParams(RenderParams):
    """The second synthetic world, in HMDB51's layout (videos only: teachers train on the first
    world's images); mirrors pipeline.data.synth.HmdbWorldSpec, which also checks cross-field
    rules (reported under `synth_hmdb`). Its class set, group counts, codec and lists are its
    own; `classes` None: all 8 (synth.HMDB_CLASSES)."""

    # HMDB51 is the smaller dataset: 14 source videos (groups) per class against `synth`'s 25
    groups_per_class: Annotated[int, Field(ge=2, le=99)] = 14
    test_groups: PosInt = 4  # per class and split, tagged 2 (test): 70/30 train/test, as HMDB51
    unused_groups: NonNegInt = 1  # per class and split, tagged 0, as HMDB51's surplus clips
    qscale: Annotated[int, Field(ge=1, le=31)] = 5  # MPEG-4 part 2 quantiser (2 best .. 31)


class IngestParams(Section):
    short_side: Annotated[int, Field(ge=16, le=1024)] = 48  # frames resized to this short side
    num_shards: Annotated[int, Field(ge=1, le=4096)] = 4  # fixed, so the DAG stays static
    codec: Literal["jpeg", "raw"] = "raw"  # per-frame storage, chosen by measurement (README)
    jpeg_quality: Annotated[int, Field(ge=10, le=100)] = 90
    min_frames: PosInt = 16  # shorter videos are rejected: no sampler can fill a clip
    strict: bool = False  # any rejected input fails the stage
    seed: NonNegInt = 0  # draws the labeled subsets
    percents: tuple[Annotated[int, Field(ge=1, le=100)], ...] = (1, 5, 10, 20, 50)


class ClipParams(Section):
    frames: Annotated[int, Field(ge=1, le=128)] = 8
    stride: Annotated[int, Field(ge=1, le=16)] = 2
    crop: Annotated[int, Field(ge=8, le=512)] = 40
    test_clips: Annotated[int, Field(ge=1, le=32)] = 5  # K uniformly spaced clips per test video
    three_crop: bool = True  # x 3 spatial crops per clip at test time


class ModelParams(Section):
    name: Literal["r3d_18", "r2plus1d_18", "c3d", "tsn_resnet18", "tsn_resnet50"] = "r3d_18"
    width: Annotated[int, Field(ge=1, le=256)] = 8
    layers: tuple[PosInt, PosInt, PosInt, PosInt] | None = (1, 1, 1, 1)
    stem_stride: Annotated[int, Field(ge=1, le=8)] = 4
    stem_pool: bool | None = False

    @model_validator(mode="after")
    def _c3d_has_fixed_groups(self):
        if self.name == "c3d" and (self.layers is not None or self.stem_pool is not None):
            raise ValueError("c3d has fixed conv groups: set layers and stem_pool to null")
        return self


class TrainParams(Section):
    epochs: Annotated[int, Field(ge=1, le=10000)] = 30
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 5e-4
    nesterov: bool = False
    schedule: Literal["constant", "step", "cosine", "plateau"] = "cosine"
    milestones: tuple[PosInt, ...] = ()
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    warmup_epochs: NonNegInt = 2
    plateau_patience: PosInt = 10
    plateau_factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    grad_clip: Annotated[float, Field(gt=0.0)] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = True  # channels-last weights and clips: 1.6x faster on CPU too
    val_every: PosInt = 1
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.15  # carved from train, by group
    workers: NonNegInt = 0  # DataLoader worker processes per run


class AugmentParams(Section):
    """Teaching Yourself's video-consistent augmentation (pipeline.data.augment.VideoAugment)."""

    ops: tuple[
        Literal["flip", "contrast", "brightness", "hue", "blur", "channel_split", "noise"], ...
    ] = ("flip", "contrast", "brightness", "hue", "blur", "channel_split", "noise")
    p: Fraction = 0.5
    noise_std: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1


class SelfKDParams(Section):
    tau: Annotated[float, Field(gt=0.0)] = 5.0  # the paper's best; the authors' code: 10
    lam: Annotated[float, Field(ge=0.0)] = 0.2  # the paper's best; the authors' code: 0.1
    teacher_init: Literal["none", "random"] = "none"  # before the first val improvement
    # Hinton's tau^2 factor; the paper's equation and the authors' code have none (selfkd_table3
    # also runs the other choice)
    tau_squared: bool = False


class TeacherParams(Section):
    """One frozen image teacher: where its weights come from (README, "Teachers")."""

    # synthetic: trained by the `teacher` stage on its synthetic image set (the embedded default);
    # torchvision / places365 / schp: an official checkpoint file; finetune: trained by the
    # `teacher` stage on a real image set (BU101, Stanford40), starting from the imagenet teacher.
    source: Literal["synthetic", "torchvision", "places365", "schp", "finetune"] = "synthetic"
    checkpoint: str = ""  # the official file; torchvision: "" looks in the TORCH_HOME cache
    images: str = ""  # image dataset root; "" = the synthetic world's images/<set>
    arch: Literal["resnet18", "resnet50"] = "resnet18"  # real classifier teachers
    label_set: Literal["pascal", "lip", "atr"] = "pascal"  # schp checkpoints
    categories: str = ""  # places365: categories_places365.txt ("" = class indices)
    # training (synthetic / finetune): the image sets differ in size, so each has its own
    epochs: Annotated[int, Field(ge=1, le=1000)] = 8
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    input_size: Annotated[int, Field(ge=8, le=1024)] = 32  # the network's input side


class SyntheticTeacherParams(Section):
    """How the `teacher` stage builds the small synthetic teachers (pipeline/teachers)."""

    width: Annotated[int, Field(ge=1, le=256)] = 8  # classifiers: a width-8 resnet18, 64-d
    layers: tuple[PosInt, PosInt, PosInt, PosInt] = (1, 1, 1, 1)
    stem_stride: Annotated[int, Field(ge=1, le=8)] = 2
    parser_width: Annotated[int, Field(ge=1, le=256)] = 16  # the tiny encoder-decoder parser
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05


class TeachersParams(Section):
    imagenet: TeacherParams = TeacherParams()
    places: TeacherParams = TeacherParams()
    bu101: TeacherParams = TeacherParams()
    stanford40: TeacherParams = TeacherParams()
    schp: TeacherParams = TeacherParams()
    synthetic: SyntheticTeacherParams = SyntheticTeacherParams()


class FeaturesParams(Section):
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 512  # frames per teacher forward pass
    parts_size: Annotated[int, Field(ge=1, le=128)] = 8  # side of the cached schp part maps
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DTGParams(Section):
    """DTG-Net (pipeline/methods/dtg.py): self-supervised pretraining guided by frozen teachers,
    then fine-tuning on a labeled subset. Where the paper is silent the choice is ours (README)."""

    students: dict[Literal["r3d", "tsn"], ModelParams] = {
        "r3d": ModelParams(name="r3d_18"),
        "tsn": ModelParams(name="tsn_resnet18", width=16),
    }
    student: Literal["r3d", "tsn"] = "r3d"  # the student of every table-3 row
    segments: Annotated[int, Field(ge=1, le=64)] = 4  # T: one random frame per segment
    crop: Annotated[int, Field(ge=8, le=512)] = 48
    guidance: Literal["img", "seq"] = "seq"  # teachers see one frame or the whole sequence
    overlap: bool = True  # anchor and guidance sequences may share frames (the paper's better)
    tau: Annotated[float, Field(gt=0.0)] = 0.07  # InfoNCE temperature
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 512  # K negatives per teacher
    # projection head student -> each teacher's space: hidden width of MoCo v2's MLP, 0 = linear
    proj_hidden: Annotated[int, Field(ge=0, le=8192)] = 0
    # flip the anchor clip at random: the teachers saw unflipped frames, so a flipped anchor asks
    # the student to give mirrored motion (WalkLeft <-> WalkRight) its original's features
    anchor_flip: bool = False
    online1_temperature: Annotated[float, Field(gt=0.0)] = 0.1  # softmax over cosine similarity
    online2_temperature: Annotated[float, Field(gt=0.0)] = 0.1  # softmax over -rank / (K + 1)
    # offline weights: softmax over the single-teacher rows' top-1 (percent) on the validation
    # carve ("val", so the test split never selects anything) or on the test split (the paper)
    offline_from: Literal["val", "test"] = "val"
    labeled_percent: Literal[1, 5, 10, 20, 50, 100] = 20  # fine-tuning budget (100 = all)
    alpha: Annotated[float, Field(ge=0.0)] = 0.1  # supervised DTG: alpha * L_CT + beta * L_CE
    beta: Annotated[float, Field(ge=0.0)] = 1.0
    pretrain: TrainParams = TrainParams(epochs=20, batch_size=32, lr=0.1, warmup_epochs=1)
    finetune: TrainParams = TrainParams(
        epochs=15, batch_size=32, lr=0.05, warmup_epochs=1, val_every=15
    )
    finetune_clips: ClipParams = ClipParams(frames=4, stride=8, crop=48, test_clips=3)


class TimeBalanceSSLParams(Section):
    """TimeBalance's two SSL teachers (pipeline/methods/timebalance.py; spec (a), (b), (g)).

    Paper and authors' code disagree in places; each such choice is a key (README, "TimeBalance").
    """

    num_clips: Annotated[int, Field(ge=2, le=16)] = 4  # n local clips per video (Table 5: 2)
    clip_frames: Annotated[int, Field(ge=1, le=128)] = 8  # frames per local clip
    stride: Annotated[int, Field(ge=1, le=16)] = 1  # within a local clip (paper: consecutive)
    global_frames: Annotated[int, Field(ge=1, le=512)] = 32  # spread over the whole video
    augmentations: Annotated[int, Field(ge=1, le=2)] = 2  # of each local clip (L_D1 needs 2)
    global_augmentations: Annotated[int, Field(ge=1, le=2)] = 2  # of the global clip
    crop: Annotated[int, Field(ge=8, le=512)] = 40
    flip: bool = False  # a flip turns WalkLeft into WalkRight: invariance to it loses a class
    # colour augmentation, one draw per clip (spec (a): contrast, hue, saturation, brightness,
    # grey, channel drop). Ours: contrast, brightness, channel_split at p 0.8, chosen by the SSL
    # backbones' linear probe on validation (README, "TimeBalance"); hue, as good, is 4x slower
    augment: AugmentParams = AugmentParams(ops=("contrast", "brightness", "channel_split"), p=0.8)
    tau: Annotated[float, Field(gt=0.0)] = 0.1  # paper 4.2 and code
    head_hidden: Annotated[int, Field(ge=1, le=8192)] = 512  # g's hidden width: paper 512, code 128
    embed_dim: Annotated[int, Field(ge=1, le=8192)] = 128
    loss_form: Literal["paper", "ntxent"] = "paper"  # Eq. 1/3, or the code's NT-Xent
    invariant_global_weight: Annotated[float, Field(ge=0.0)] = 0.0  # the code's global L_I term
    local_weight: Annotated[float, Field(ge=0.0)] = 1.0  # L_D1 (local-local)
    global_local_weight: Annotated[float, Field(ge=0.0)] = 1.0  # L_D2 (global-local)
    # paper: Adam 1e-3 halved on plateau; code: Adam 5e-3 (spec (g)4); ours: Adam 1e-3, cosine
    pretrain: TrainParams = TrainParams(
        epochs=10, batch_size=16, optimizer="adam", lr=1e-3, weight_decay=0.0, warmup_epochs=1
    )

    @model_validator(mode="after")
    def _losses_have_their_views(self):
        if self.local_weight > 0 and self.augmentations < 2:
            raise ValueError("local_weight > 0 (L_D1) needs augmentations: 2")
        if self.local_weight + self.global_local_weight == 0:
            raise ValueError("local_weight and global_local_weight are both 0: f_D has no loss")
        return self


class TimeBalanceStudentParams(Section):
    """The semi-supervised student (spec (e)): CE + omega * D(p_T, p_S)."""

    distance: Literal["l2", "kl", "js"] = "l2"  # Table 6; paper and code: l2
    class_reduction: Literal["mean", "sum"] = "mean"  # the code's MSE mean over classes
    # the code's weights on labeled / unlabeled clips; the paper has one omega, value not given
    omega_labeled: Annotated[float, Field(ge=0.0)] = 50.0
    omega_unlabeled: Annotated[float, Field(ge=0.0)] = 100.0
    # Adam (the paper's 1e-3; the code's 1e-4): omega 100 on an MSE of probabilities makes SGD's
    # step 100 times larger, and SGD at 0.05 diverges (the oracle test, tests/test_oracle.py)
    train: TrainParams = TrainParams(
        epochs=15, batch_size=16, optimizer="adam", lr=1e-3, weight_decay=0.0, warmup_epochs=1
    )


class TimeBalanceParams(Section):
    """TimeBalance (pipeline/methods/timebalance.py, pipeline/timebalance.py)."""

    backbone: ModelParams = ModelParams(name="r3d_18")  # the teachers' and the student's
    ssl: TimeBalanceSSLParams = TimeBalanceSSLParams()
    similarity_clamp: bool = False  # clamp s to [0, 1]: ours; the paper leaves s in [-1, 1]
    # clips of every fine-tune and student (and their tests)
    # test: 3 clips x 1 centre crop (the code's 1 crop; the paper's 3 scales triple the test)
    clips: ClipParams = ClipParams(frames=8, stride=2, crop=40, test_clips=3, three_crop=False)
    # f_S, f_I and f_D: supervised fine-tuning on the labeled subset from their SSL backbones
    finetune: TrainParams = TrainParams(epochs=15, batch_size=16, lr=0.05, warmup_epochs=1)
    student: TimeBalanceStudentParams = TimeBalanceStudentParams()
    # A fine-tune or student on a smaller labeled budget trains for as many optimisation steps
    # as one at this budget (epochs x this / its percent, validated as often): at 5% a 15-epoch
    # run of 50 videos is 45 steps. The paper trains 150 epochs at every budget. null: off.
    equal_steps_percent: Annotated[int, Field(ge=1, le=100)] | None = 20


class HPKDWeights(Section):
    """L = kd L_KL + motion L_m + appearance L_a (Eq. 7; the paper gives no values). motion and
    appearance: 1, as RSPNet weighs its two tasks; kd: 10, chosen on validation (README,
    "Human-parsing KD": at 1 the KD term is a twentieth of the loss)."""

    kd: Annotated[float, Field(gt=0.0)] = 10.0
    motion: Annotated[float, Field(ge=0.0)] = 1.0
    appearance: Annotated[float, Field(ge=0.0)] = 1.0


class HPKDPretrainParams(Section):
    """The multi-task pre-training (pipeline/methods/hpkd.py; spec sections 2, 3, 5)."""

    clip_frames: Annotated[int, Field(ge=2, le=64)] = 8  # T; the 2x key window spans 2T frames
    crop: Annotated[int, Field(ge=8, le=512)] = 40  # inside the centre square the teacher saw
    flip: bool = False  # RSPNet flips; here a flip would turn WalkLeft into WalkRight
    # colour jitter per clip (RSPNet: ColorJitter .4 and grey p .2); the set TimeBalance's SSL
    # teachers chose on validation, so every method's pre-training sees the same views
    augment: AugmentParams = AugmentParams(ops=("contrast", "brightness", "channel_split"), p=0.8)
    parts_out: Annotated[int, Field(ge=2, le=128)] = 8  # side of g_h's map and of the target
    decoder_hidden: Annotated[int, Field(ge=1, le=4096)] = 32  # g_h's 3x3 conv width
    # g_h's sub-pixel upsampling factor: h_h's map side x this ~ parts_out (tiny backbones at
    # 40 px: 2 x 2 maps; full size at 112 px: 7 x 7, so 1 or 2 there)
    decoder_upscale: Annotated[int, Field(ge=1, le=32)] = 4
    weights: HPKDWeights = HPKDWeights()
    embed_dim: Annotated[int, Field(ge=1, le=8192)] = 128  # g_m, g_a outputs (RSPNet)
    tau: Annotated[float, Field(gt=0.0)] = 0.07  # RSPNet's, for both tasks
    margin: Annotated[float, Field(ge=0.0)] = 2.0  # RSPNet's margin on cosine / tau
    # RSPNet: 0.999 over 200 Kinetics epochs; 0.99 lets the key encoder follow within the few
    # hundred steps of a run here (0.999^536 = 0.58 of the initial weights left)
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    # RSPNet: 16384 keys; here about one epoch of the world's train videos, as DTG-Net's queue
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 512
    # RSPNet: SGD, lr 0.1 x batch / 64, momentum 0.9, wd 1e-4, cosine (200 epochs); 8 epochs
    # probe on validation as well as 10 (README) and keep each table within 15 minutes
    train: TrainParams = TrainParams(
        epochs=8, batch_size=16, lr=0.025, weight_decay=1e-4, warmup_epochs=1
    )


class HPKDParams(Section):
    """The human-parsing KD method (pipeline/methods/hpkd.py, pipeline/hpkd.py, README)."""

    backbones: dict[Literal["c3d", "r2plus1d"], ModelParams] = {
        "c3d": ModelParams(name="c3d", layers=None, stem_pool=None),
        "r2plus1d": ModelParams(name="r2plus1d_18"),
    }
    # stages in f_l (stem, layer1, ...); "full" has two copies of the rest (h_h, h_c)
    shared_stages: Annotated[int, Field(ge=1, le=4)] = 3
    pretrain: HPKDPretrainParams = HPKDPretrainParams()
    labeled_percent: Literal[1, 5, 10, 20, 50, 100] = 20  # fine-tuning budget, as DTG-Net's
    clips: ClipParams = ClipParams(frames=8, stride=2, crop=40, test_clips=3, three_crop=False)
    # validated once, at the end (the last epoch is tested; nothing is selected on validation)
    finetune: TrainParams = TrainParams(
        epochs=15, batch_size=16, lr=0.05, warmup_epochs=1, val_every=15
    )


def budget_epochs(train: dict, percent: int, equal_steps_percent: int | None) -> dict:
    """`train` (a TrainParams dump) with its epochs, warm-up and val_every scaled by
    equal_steps_percent / percent when the labeled budget is smaller (TimeBalanceParams)."""
    if equal_steps_percent is None or percent >= equal_steps_percent:
        return train
    scale = round(equal_steps_percent / percent)
    return {
        **train,
        "epochs": train["epochs"] * scale,
        "warmup_epochs": train["warmup_epochs"] * scale,
        "val_every": train["val_every"] * scale,
    }


class SeedsTable(Section):
    seeds: tuple[NonNegInt, ...] = (0, 1, 2)


class SelfKDGridTable(Section):
    taus: tuple[Annotated[float, Field(gt=0.0)], ...] = (5.0, 10.0, 20.0)
    lambdas: tuple[Annotated[float, Field(ge=0.0)], ...] = (0.1, 0.2, 0.5)
    seeds: tuple[NonNegInt, ...] = (0,)


class BudgetsTable(Section):
    seeds: tuple[NonNegInt, ...] = (0, 1, 2)
    percents: tuple[Literal[1, 5, 10, 20, 50], ...] = (5, 20)  # labeled budgets (ingest.percents)


class BackbonesTable(Section):
    seeds: tuple[NonNegInt, ...] = (0, 1, 2)
    backbones: tuple[Literal["c3d", "r2plus1d"], ...] = ("c3d", "r2plus1d")


class TablesParams(Section):
    selfkd_table3: SeedsTable = SeedsTable()
    selfkd_table8: SelfKDGridTable = SelfKDGridTable()
    table3: SeedsTable = SeedsTable()  # DTG-Net: teachers and weightings
    table2: SeedsTable = SeedsTable(seeds=(0,))  # DTG-Net: input ablation
    table4: SeedsTable = SeedsTable()  # DTG-Net: supervised DTG vs without
    table1: SeedsTable = SeedsTable()  # DTG-Net: initialisations vs DTG
    # TimeBalance: the student vs supervised training
    tb_table1: BudgetsTable = BudgetsTable(percents=(5, 10, 20, 50))
    tb_table2: BudgetsTable = BudgetsTable()  # TimeBalance: teacher contributions
    tb_table3: BudgetsTable = BudgetsTable()  # TimeBalance: the same, random-init student
    tb_table4: BudgetsTable = BudgetsTable(seeds=(0,))  # TimeBalance: which teacher pair
    tb_table5: BudgetsTable = BudgetsTable(seeds=(0,))  # TimeBalance: n = 2 vs 4 SSL clips
    tb_table6: BudgetsTable = BudgetsTable(seeds=(0,), percents=(5, 20, 50))  # L2 / KL / JS
    hpkd_table1: BackbonesTable = BackbonesTable()  # human-parsing KD: Scratch, RSP, Full
    hpkd_table2: BackbonesTable = BackbonesTable(backbones=("r2plus1d",))  # w/o KD, TI, Full


class DistributedParams(Section):
    """Processes per training run (torchrun; pipeline/distributed.py). Every stage that trains
    runs `processes` processes on each of `nodes` nodes, one GPU each; every batch size in these
    params stays the global batch (it must split evenly over the processes), so results do not
    depend on the process count beyond float rounding. nodes > 1 runs only inside a SLURM
    allocation (`srun`, profiles/slurm)."""

    processes: Annotated[int, Field(ge=1, le=64)] = 1
    nodes: Annotated[int, Field(ge=1, le=1024)] = 1


class Params(Section):
    dataset: str = "synth"  # the video dataset every stage runs on (a key of `datasets`)
    datasets: dict[str, VideoDataset]
    synth: SynthParams = SynthParams()
    synth_hmdb: SynthHMDBParams = SynthHMDBParams()  # `python -m pipeline synth --world hmdb51`
    ingest: IngestParams = IngestParams()
    clips: ClipParams = ClipParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    augment: AugmentParams = AugmentParams()
    selfkd: SelfKDParams = SelfKDParams()
    teachers: TeachersParams = TeachersParams()
    features: FeaturesParams = FeaturesParams()
    dtg: DTGParams = DTGParams()
    timebalance: TimeBalanceParams = TimeBalanceParams()
    hpkd: HPKDParams = HPKDParams()
    distributed: DistributedParams = DistributedParams()
    tables: TablesParams = TablesParams()

    @model_validator(mode="after")
    def _dataset_known(self):
        if self.dataset not in self.datasets:
            known = ", ".join(sorted(self.datasets))
            raise ValueError(f"dataset '{self.dataset}' is not a key of datasets ({known})")
        synthetic_images = [
            name for name, teacher in self.teachers if isinstance(teacher, TeacherParams)
            and not teacher.images and teacher.source in ("synthetic", "finetune")
        ]  # fmt: skip
        if "synth" not in self.datasets and synthetic_images:
            raise ValueError(
                f"datasets.synth is missing, but teachers {synthetic_images} train on the "
                "synthetic world's images (teachers.<name>.images is empty)"
            )
        budgets = {
            "dtg.labeled_percent": [self.dtg.labeled_percent],
            "hpkd.labeled_percent": [self.hpkd.labeled_percent],
        } | {
            f"tables.{name}.percents": list(getattr(self.tables, name).percents)
            for name in TablesParams.model_fields
            if name.startswith("tb_")
        }
        for key, percents in budgets.items():
            for budget in percents:
                if budget != 100 and budget not in self.ingest.percents:
                    raise ValueError(
                        f"{key} {budget} is not among ingest.percents "
                        f"{list(self.ingest.percents)}: ingest would not write that labeled subset"
                    )
        return self


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def validate_params(raw: dict) -> Params:
    """Validate a params dict; raise ConfigError naming the first bad dotted key.

    Strict about types: "4" is no int, "yes" no bool, 4 no str (an int is a float, though), where
    pydantic's default would coerce them. Validated as JSON, whose strict mode takes lists for
    tuples (YAML has no tuples); values JSON lacks (a YAML date) are passed as their text.
    """
    try:
        return Params.model_validate_json(json.dumps(raw, default=str), strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        loc = first["loc"]
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "value_error" and not loc:
            message = message.removeprefix("Value error, ")
        raise ConfigError(f"params: {_dotted(loc)}: {message}") from None


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: `1e-3` is a float (as DVC's ruamel reads
    params.yaml), not the string PyYAML's YAML 1.1 makes of it, which the strict schema refuses."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file {path} not found (run from the project root)")
    try:
        raw = yaml.load(path.read_text(), Loader=ParamsLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"params: {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {path} must hold a mapping of sections")
    return validate_params(raw)


def lookup(params: Params, dotted: str):
    """The value at a dotted key ('ingest.codec', 'datasets.synth'), as plain data."""
    value = params.model_dump(mode="json")
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"params: {dotted}: no such key")
        value = value[part]
    return value


class DeclaredParams:
    """A view of the validated params exposing only the keys a stage declared.

    Stages read params through this view so that an undeclared read fails loudly instead of
    silently escaping the DAG's change tracking (Snakemake `params:` and DVC `params:`).
    """

    def __init__(self, value, declared: tuple[str, ...], prefix: str = ""):
        self._value = value
        self._declared = declared
        self._prefix = prefix

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        dotted = f"{self._prefix}.{name}" if self._prefix else name
        if isinstance(self._value, dict):
            if name not in self._value:
                raise AttributeError(f"params has no key '{dotted}'")
            child = self._value[name]
        else:
            child = getattr(self._value, name)
        if any(dotted == key or dotted.startswith(key + ".") for key in self._declared):
            return child
        if any(key.startswith(dotted + ".") for key in self._declared):
            return DeclaredParams(child, self._declared, dotted)
        raise ConfigError(f"stage reads params key '{dotted}' but does not declare it")

    def __getitem__(self, name: str):
        return self.__getattr__(name)
