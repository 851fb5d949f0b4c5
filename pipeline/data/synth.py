"""The embedded default dataset: a synthetic action world written in real datasets' layouts.

Videos (UCF101 layout, H.264 .mp4) show a rendered articulated person performing one of 12
actions. Some actions are recognisable from a single frame's pose (RaiseArms, Punch, Kick, ...),
others only from motion or temporal order (WalkLeft vs WalkRight, SitDown vs StandUp). Scenes
correlate weakly and held objects moderately with the action, so still-image teachers trained on
the image datasets written alongside (objects ~ ImageNet, scenes ~ Places365, bu101, stanford40,
parsing ~ SCHP/LIP with Pascal-Person-Part labels) carry information that helps. Videos come in
groups (gXX) sharing actor appearance, scene and object, as in UCF101, and split 1 puts whole
groups in the test list.

A second, smaller world (`generate_hmdb_world`, `HmdbWorldSpec`) is drawn the same way in the
HMDB51 layout: 8 classes, five of them the first world's actions and three that its videos never
show, MPEG-4 part 2 .avi files named as HMDB51 names its clips, and three official-style splits.

Every random choice comes from `np.random.default_rng([seed, stream, *keys])`, one stream per
dataset and one key per item, so the world does not depend on the number of workers or the order
in which they finish. Drawing lives in pipeline.data.render.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data import render
from pipeline.data.render import (
    ALL_ACTIONS,
    HAIR_COLORS,
    OBJECT_COLORS,
    OBJECT_NAMES,
    PART_NAMES,
    POSES,
    SCENE_NAMES,
    SCENES,
    SKIN_TONES,
    VIDEO_ACTIONS,
    Clip,
    Look,
)
from pipeline.errors import DataError
from pipeline.io import atomic_path, file_sha256

ACTION_NAMES = tuple(VIDEO_ACTIONS)

# Stanford40-style still actions: overlap the video classes' poses partly, plus poses that no
# video shows. Value = the pose (key of render.POSES) the image shows.
STANFORD40_ACTIONS = {
    "applauding": "Clap",
    "hands_on_hips": "hands_on_hips",
    "jumping": "Jump",
    "pointing": "pointing",
    "raising_arms": "RaiseArms",
    "sitting": "SitDown",
    "standing_on_one_leg": "standing_on_one_leg",
    "stretching_arms": "stretching_arms",
    "walking": "WalkLeft",
    "waving_hands": "Wave",
}

# What every actor would wear at appearance_var = 0.
CANONICAL_OUTFIT = {
    "skin": np.array([215.0, 170.0, 130.0]),
    "hair": np.array([50.0, 35.0, 25.0]),
    "shirt": np.array([200.0, 50.0, 45.0]),
    "pants": np.array([40.0, 50.0, 95.0]),
}

# One random stream per kind of item; keys within a stream identify the item.
_STREAMS = {
    "group": 1,
    "clip": 2,
    "objects": 3,
    "scenes": 4,
    "bu101": 5,
    "stanford40": 6,
    "parsing": 7,
    "splits": 8,
    # The second world (HMDB51 layout): streams of its own, so that its videos are not the
    # first world's under other names.
    "hmdb_group": 9,
    "hmdb_clip": 10,
    "hmdb_title": 11,
    "hmdb_splits": 12,
}


@dataclass(frozen=True)
class WorldSpec:
    """Every knob of the synthetic world. Same spec => the same decoded frames and list files."""

    seed: int = 0  # root of every random stream
    frame_height: int = 48  # video frame height in pixels (even: H.264 yuv420p)
    frame_width: int = 64  # video width; 4:3 like UCF101 (decord misreads widths 16/24/48/72)
    num_frames: int = 32  # frames per video
    fps: int = 25  # video frame rate
    classes: tuple[str, ...] = ACTION_NAMES  # video action classes, a subset of ACTION_NAMES
    groups_per_class: int = 25  # UCF-style groups (shared actor, scene, object) per class
    clips_per_group: int = 5  # videos per group
    test_groups: int = 7  # groups 1..test_groups go to testlist01, the rest to trainlist01
    crf: int = 20  # libx264 constant rate factor (lower = better quality, bigger files)
    write_video_masks: bool = False  # also write <out>/masks/<Class>/<video>.npz part masks
    image_size: int = 48  # side of every still image (square)
    objects_train_per_class: int = 400  # ImageNet analogue, 10 classes: the largest image set
    objects_val_per_class: int = 50  # validation images per object class
    scenes_train_per_class: int = 300  # Places365 analogue, 8 categories
    scenes_val_per_class: int = 50  # validation images per scene category
    scene_person_prob: float = 0.5  # P(a scene image also shows a person)
    bu101_per_class: int = 120  # still frames of the video actions
    stanford40_train_per_class: int = 40  # 10 still actions: the smallest image set
    stanford40_test_per_class: int = 20  # test images per still action
    parsing_train: int = 1200  # person images with Pascal-Person-Part label maps
    parsing_val: int = 200  # validation person images
    texture_contrast: float = 1.0  # strength of scene textures (0 = flat two-colour scenes)
    noise_std: float = 6.0  # per-pixel Gaussian noise std on the 0-255 scale
    camera_jitter_px: float = 0.7  # per-frame camera shake std in pixels
    camera_pan: float = 0.2  # camera pans up to this many world units (frame height = 2) a clip
    zoom_range: float = 0.2  # zoom drawn log-uniformly from [1 / (1 + z), 1 + z]
    speed_range: float = 1.5  # playback speed drawn log-uniformly from [1 / s, s]
    amplitude_var: float = 0.25  # per-clip motion amplitude drawn from [1 - a, 1 + a]
    appearance_var: float = 0.5  # actor colours: 0 = one outfit for all, 1 = fully random
    person_height: float = 0.75  # a standing person's height as a fraction of the frame height
    body_size_var: float = 0.15  # per-group body height drawn from [1 - b, 1 + b] x person_height
    brightness_var: float = 0.2  # per-clip lighting gain drawn from [1 - v, 1 + v]
    scene_correlation: float = 0.3  # P(a group's scene is its action's preferred one), else uniform
    object_correlation: float = 0.5  # P(a group's object is its action's preferred), else uniform
    no_object_prob: float = 0.2  # P(a group's actor holds nothing)

    def __post_init__(self):
        unknown = sorted(set(self.classes) - set(ACTION_NAMES))
        if unknown or len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(
                f"classes must be distinct names from {ACTION_NAMES}, got {self.classes}"
            )
        if self.frame_height % 2 or self.frame_width % 2:
            raise ValueError("frame_height and frame_width must be even (H.264 yuv420p)")
        if not 1 <= self.test_groups < self.groups_per_class <= 99:
            raise ValueError("need 1 <= test_groups < groups_per_class <= 99 (two-digit gXX)")
        if not 1 <= self.clips_per_group <= 99:
            raise ValueError("clips_per_group must be in 1..99 (two-digit cYY)")
        for name in (
            "scene_correlation",
            "object_correlation",
            "no_object_prob",
            "scene_person_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")

    @property
    def class_names(self) -> list[str]:
        """Video classes in classInd order (alphabetical, as in UCF101)."""
        return sorted(self.classes)


# The second world's classes: HMDB51 class folder -> the action it shows (render.ALL_ACTIONS).
# clap, jump, kick, sit and wave are HMDB51's own names for five of the first world's actions (its
# Clap, Jump, Kick, SitDown, Wave, with the same preferred scene and object); balance, point and
# stretch_arms are actions the first world's videos never show (its Stanford40-style still images
# do: standing_on_one_leg, pointing, stretching_arms), in render.EXTRA_VIDEO_ACTIONS.
HMDB_CLASSES = {
    "balance": "Balance",
    "clap": "Clap",
    "jump": "Jump",
    "kick": "Kick",
    "point": "PointAt",
    "sit": "SitDown",
    "stretch_arms": "StretchArms",
    "wave": "Wave",
}
HMDB_CLASS_NAMES = tuple(HMDB_CLASSES)
HMDB_SPLITS = (1, 2, 3)


@dataclass(frozen=True)
class HmdbWorldSpec:
    """Every knob of the second world (HMDB51 layout, videos only: the teachers' still images are
    the first world's). Knobs named as in WorldSpec mean the same, with the same defaults: the
    same renderer, frame size, noise and camera model; what differs is the class set, fewer groups
    per class (HMDB51 is the smaller dataset), the container and codec, the names and the lists."""

    seed: int = 0  # root of every random stream (streams of its own: not the first world's videos)
    frame_height: int = 48  # as WorldSpec
    frame_width: int = 64  # as WorldSpec (decord misreads widths 16/24/48/72)
    num_frames: int = 32
    fps: int = 25
    classes: tuple[str, ...] = HMDB_CLASS_NAMES  # a subset of HMDB_CLASS_NAMES
    # Groups are HMDB51's source videos: the clips of one share actor, scene and held object (the
    # title in their names); 14 x 5 = 70 clips per class against the first world's 25 x 5.
    groups_per_class: int = 14
    clips_per_group: int = 5
    # Per class and split, whole groups tagged 2 (test) and 0 (unused, as HMDB51's clips beyond
    # its 70 train + 30 test per class); the rest are tagged 1 (train): 45 / 20 / 5 clips.
    test_groups: int = 4
    unused_groups: int = 1  # at most test_groups: then every group is train or test in some split
    # MPEG-4 part 2 quantiser (2 best .. 31): at 5 the decoded frames differ from the rendered ones
    # by 8.6 grey levels on average, the first world's x264 at crf 20 by 8.4 (8 videos, measured).
    qscale: int = 5
    texture_contrast: float = 1.0
    noise_std: float = 6.0
    camera_jitter_px: float = 0.7
    camera_pan: float = 0.2
    zoom_range: float = 0.2
    speed_range: float = 1.5
    amplitude_var: float = 0.25
    appearance_var: float = 0.5
    person_height: float = 0.75
    body_size_var: float = 0.15
    brightness_var: float = 0.2
    scene_correlation: float = 0.3
    object_correlation: float = 0.5
    no_object_prob: float = 0.2

    def __post_init__(self):
        unknown = sorted(set(self.classes) - set(HMDB_CLASS_NAMES))
        if unknown or len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(
                f"classes must be distinct names from {HMDB_CLASS_NAMES}, got {self.classes}"
            )
        if self.frame_height % 2 or self.frame_width % 2:
            raise ValueError("frame_height and frame_width must be even (yuv420p)")
        if not 0 <= self.unused_groups <= self.test_groups:
            raise ValueError("need 0 <= unused_groups <= test_groups")
        if self.test_groups < 1 or not (
            self.test_groups + self.unused_groups < self.groups_per_class <= 99
        ):
            raise ValueError(
                "need 1 <= test_groups and test_groups + unused_groups < groups_per_class <= 99 "
                "(at least one train group per split)"
            )
        if not 1 <= self.clips_per_group <= 99:
            raise ValueError("clips_per_group must be in 1..99")
        if not 1 <= self.qscale <= 31:
            raise ValueError("qscale must be in 1..31 (MPEG-4 part 2 quantiser)")
        for name in ("scene_correlation", "object_correlation", "no_object_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")

    @property
    def class_names(self) -> list[str]:
        """Video classes in label order (HMDB51's reader sorts the class folders)."""
        return sorted(self.classes)


def _rng(spec: WorldSpec | HmdbWorldSpec, stream: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _STREAMS[stream], *keys])


# ---------------------------------------------------------------------------------------------
# Sampling looks and clips.


def sample_look(
    rng: np.random.Generator,
    spec: WorldSpec | HmdbWorldSpec,
    *,
    scene: str,
    scene_correlation: float,
    obj: str,
    object_correlation: float,
) -> Look:
    """An actor, scene and held object: the preferred `scene`/`obj` with the given probability,
    otherwise uniform (an empty `scene`/`obj` preference means uniform)."""
    if not (scene and rng.random() < scene_correlation):
        scene = str(rng.choice(SCENE_NAMES))
    style = SCENES[scene]
    size_var = spec.body_size_var
    scene_colors = np.clip(np.array(style.colors, float) + rng.normal(0, 12, (4, 3)), 0, 255)
    if rng.random() < spec.no_object_prob:
        obj = ""
    elif not (obj and rng.random() < object_correlation):
        obj = str(rng.choice(OBJECT_NAMES))
    obj_color = np.clip(
        np.array(OBJECT_COLORS[obj or "ball"], float) + rng.normal(0, 15, 3), 0, 255
    )
    skin = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))], float) + rng.normal(0, 8, 3)
    hair = np.array(HAIR_COLORS[rng.integers(len(HAIR_COLORS))], float)
    shirt = render.random_color(rng, sat=(0.3, 0.9), val=(0.35, 0.95))
    pants = render.random_color(rng, sat=(0.1, 0.6), val=(0.15, 0.6))

    def vary(canonical, drawn):
        # Actors look alike at appearance_var 0 (one outfit) and fully random at 1: how much
        # appearance differs between groups is what a from-scratch model must see through.
        return np.clip(canonical + spec.appearance_var * (drawn - canonical), 0, 255)

    return Look(
        scene=scene,
        scene_colors=scene_colors,
        scene_freq=float(rng.uniform(0.8, 1.25)),
        scene_phase=(float(rng.random()), float(rng.random())),
        horizon=style.horizon + float(rng.uniform(-0.12, 0.12)),
        texture=spec.texture_contrast,
        skin=vary(CANONICAL_OUTFIT["skin"], skin),
        hair=vary(CANONICAL_OUTFIT["hair"], hair),
        shirt=vary(CANONICAL_OUTFIT["shirt"], shirt),
        pants=vary(CANONICAL_OUTFIT["pants"], pants),
        long_sleeves=bool(rng.random() < 0.5 * spec.appearance_var),
        shorts=bool(rng.random() < 0.3 * spec.appearance_var),
        body_size=2 * spec.person_height * float(rng.uniform(1 - size_var, 1 + size_var)),
        obj=obj,
        obj_color=obj_color,
    )


def sample_clip(
    rng: np.random.Generator, spec: WorldSpec | HmdbWorldSpec, action: str, look: Look
) -> Clip:
    """Timing, placement, camera and lighting of one rendering of `action` with `look`."""
    log_speed, log_zoom = np.log(spec.speed_range), np.log(1 + spec.zoom_range)
    return Clip(
        action=action,
        look=look,
        phase0=float(rng.random()),
        mid=float(rng.uniform(0.35, 0.65)),  # symmetric about 0.5: reversing time keeps the law
        speed=float(np.exp(rng.uniform(-log_speed, log_speed))),
        amplitude=float(rng.uniform(1 - spec.amplitude_var, 1 + spec.amplitude_var)),
        mirrored=bool(ALL_ACTIONS[action].mirror and rng.random() < 0.5),
        x_mid=float(rng.uniform(-0.45, 0.45)),
        walk_dist=float(rng.uniform(0.35, 0.55)),
        # Feet placed so that raised hands (1.1 x body height) stay in frame at zoom 1.
        ground=-1.1 * spec.person_height + float(rng.uniform(-0.06, 0.06)),
        zoom=float(np.exp(rng.uniform(-log_zoom, log_zoom))),
        cam=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
        pan=(
            float(rng.uniform(-1, 1) * spec.camera_pan),
            float(rng.uniform(-0.3, 0.3) * spec.camera_pan),
        ),
        shake_px=spec.camera_jitter_px,
        shake_seed=int(rng.integers(2**31)),
        brightness=float(rng.uniform(1 - spec.brightness_var, 1 + spec.brightness_var)),
        noise_std=spec.noise_std,
        noise_seed=int(rng.integers(2**31)),
    )


def video_clip(spec: WorldSpec, class_name: str, group: int, clip: int) -> Clip:
    """The rendering parameters of video v_<class_name>_g<group>_c<clip> (1-based group, clip)."""
    class_key = ACTION_NAMES.index(class_name)
    action = VIDEO_ACTIONS[class_name]
    look = sample_look(
        _rng(spec, "group", class_key, group),
        spec,
        scene=action.scene,
        scene_correlation=spec.scene_correlation,
        obj=action.obj,
        object_correlation=spec.object_correlation,
    )
    return sample_clip(_rng(spec, "clip", class_key, group, clip), spec, class_name, look)


def render_video(
    spec: WorldSpec, class_name: str, group: int, clip: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8 as encoded into the video, body-part masks (T, H, W) in 0..6."""
    return _render(spec, video_clip(spec, class_name, group, clip))


def _render(spec, clip: Clip) -> tuple[np.ndarray, np.ndarray]:
    """Either world's clip over its spec's frames and size."""
    times = np.arange(spec.num_frames) / spec.num_frames
    return render.render_clip(clip, spec.frame_height, spec.frame_width, times)


def video_name(class_name: str, group: int, clip: int) -> str:
    return f"v_{class_name}_g{group:02d}_c{clip:02d}"


# ---------------------------------------------------------------------------------------------
# Still images.


def _random_person(
    rng: np.random.Generator, spec: WorldSpec, pose: str, look: Look, representative: bool
):
    """A clip of `pose` and the clip time to render: a random moment, or the most un-standing
    of a few random moments (a photo of an action catches it at its most characteristic)."""
    clip = sample_clip(rng, spec, pose, look)
    candidates = rng.random(8)
    if representative:
        deviation = render.pose_deviation(render.action_pose(clip, candidates))
        return clip, float(candidates[np.argmax(deviation)])
    return clip, float(candidates[0])


def _uniform_look(rng, spec: WorldSpec, scene: str = "") -> Look:
    """A look whose scene (unless given) and object do not depend on any action."""
    return sample_look(
        rng, spec, scene=scene, scene_correlation=1.0, obj="", object_correlation=0.0
    )


def _still(clip: Clip, spec: WorldSpec, t: float) -> tuple[np.ndarray, np.ndarray]:
    frames, parts = render.render_clip(clip, spec.image_size, spec.image_size, [t])
    return frames[0], parts[0]


def _object_image(rng, spec: WorldSpec, obj: str) -> np.ndarray:
    """An object of class `obj` at a random size, position and angle over a random scene."""
    look = _uniform_look(rng, spec)
    # Only the clip's camera and lighting are used: no person in object images.
    clip = dataclasses.replace(sample_clip(rng, spec, "RaiseArms", look), person=False)
    x, y = render.camera_grid(clip, spec.image_size, spec.image_size, np.array([0.5]))
    image = render.paint_scene(look, x, y)
    color = np.clip(np.array(OBJECT_COLORS[obj], float) + rng.normal(0, 15, 3), 0, 255)
    centre = rng.uniform(-0.5, 0.5, (1, 2)) + np.array(clip.cam)
    radius = float(rng.uniform(0.12, 0.5)) / clip.zoom  # small (as held in videos) to close-up
    inside = render.object_mask(obj, x, y, centre, radius, rng.uniform(0, 2 * np.pi, 1))
    image[inside] = color
    return render.finish(image, clip.brightness, clip.noise_std, clip.noise_seed)[0]


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, quality=90)


def _write_objects(spec: WorldSpec, root: Path, split: str, obj: str) -> int:
    split_key = ("train", "val").index(split)
    count = spec.objects_train_per_class if split == "train" else spec.objects_val_per_class
    folder = root / "images" / "objects" / split / obj
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = _rng(spec, "objects", OBJECT_NAMES.index(obj), split_key, i)
        _save_jpeg(folder / f"{obj}_{i}.JPEG", _object_image(rng, spec, obj))
    return count


def _write_scenes(spec: WorldSpec, root: Path, split: str, scene: str) -> int:
    split_key = ("train", "val").index(split)
    count = spec.scenes_train_per_class if split == "train" else spec.scenes_val_per_class
    folder = root / "images" / "scenes" / split / scene
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = _rng(spec, "scenes", SCENE_NAMES.index(scene), split_key, i)
        look = _uniform_look(rng, spec, scene=scene)
        clip, t = _random_person(
            rng, spec, str(rng.choice(ACTION_NAMES)), look, representative=False
        )
        clip = dataclasses.replace(clip, person=bool(rng.random() < spec.scene_person_prob))
        _save_jpeg(folder / f"{i + 1:08d}.jpg", _still(clip, spec, t)[0])
    return count


def _write_bu101(spec: WorldSpec, root: Path, class_name: str) -> int:
    folder = root / "images" / "bu101"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(spec.bu101_per_class):
        rng = _rng(spec, "bu101", ACTION_NAMES.index(class_name), i)
        look = _uniform_look(rng, spec)
        clip, t = _random_person(rng, spec, class_name, look, representative=True)
        _save_jpeg(folder / f"{class_name}_{i + 1:04d}.jpg", _still(clip, spec, t)[0])
    return spec.bu101_per_class


def _write_stanford40(spec: WorldSpec, root: Path, action: str) -> int:
    folder = root / "images" / "stanford40" / "JPEGImages"
    folder.mkdir(parents=True, exist_ok=True)
    count = spec.stanford40_train_per_class + spec.stanford40_test_per_class
    for i in range(count):
        rng = _rng(spec, "stanford40", list(STANFORD40_ACTIONS).index(action), i)
        look = _uniform_look(rng, spec)
        clip, t = _random_person(rng, spec, STANFORD40_ACTIONS[action], look, representative=True)
        _save_jpeg(folder / f"{action}_{i + 1:03d}.jpg", _still(clip, spec, t)[0])
    return count


def _parsing_ids(spec: WorldSpec, split: str) -> list[str]:
    # LIP-style numeric ids, val numbered after train so ids are unique across splits.
    start, count = (
        (0, spec.parsing_train) if split == "train" else (spec.parsing_train, spec.parsing_val)
    )
    return [f"{i:07d}" for i in range(start, start + count)]


def _write_parsing(spec: WorldSpec, root: Path, split: str, ids: list[str]) -> int:
    images = root / "images" / "parsing" / f"{split}_images"
    labels = root / "images" / "parsing" / f"{split}_segmentations"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        rng = _rng(spec, "parsing", int(image_id))
        look = _uniform_look(rng, spec)
        clip, t = _random_person(
            rng, spec, str(rng.choice(list(POSES))), look, representative=False
        )
        frame, parts = _still(clip, spec, t)
        _save_jpeg(images / f"{image_id}.jpg", frame)
        Image.fromarray(parts).save(labels / f"{image_id}.png")
    return len(ids)


# ---------------------------------------------------------------------------------------------
# Videos.


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3H/2, W) uint8 planar YUV 4:2:0, BT.601 limited range (what
    decoders assume for H.264 without colour metadata), in integer arithmetic: the same bytes on
    every CPU, where swscale's SIMD paths may round differently."""
    rgb = frame.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = (66 * r + 129 * g + 25 * b + 128 >> 8) + 16
    h, w = y.shape
    # Chroma of each 2x2 block's mean colour (sums of 4 pixels: one more shift, with rounding).
    blocks = rgb.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))
    r, g, b = blocks[..., 0], blocks[..., 1], blocks[..., 2]
    u = (-38 * r - 74 * g + 112 * b + 512 >> 10) + 128
    v = (112 * r - 94 * g - 18 * b + 512 >> 10) + 128
    planes = [np.clip(p, 0, 255).astype(np.uint8).reshape(-1) for p in (y, u, v)]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    """H.264 yuv420p, bit-identical for the same frames on any machine and in any process.

    x264's assembly reads memory whose content varies from run to run (measured: re-encoding the
    tiny world in one process changed 7 of 24 files, by up to 52 grey levels), so it runs in its
    plain C code (asm=0: about 5 ms more per video here) on one thread, from YUV planes converted
    in integer arithmetic, with explicit timestamps. Preset veryfast: at these sizes it is twice
    as fast as the default and no bigger."""
    options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "asm=0"}
    _encode(path, frames, fps, "libx264", options)


def _encode(path: Path, frames: np.ndarray, fps: int, codec: str, codec_options: dict, **container):
    """Frames (T, H, W, 3) as yuv420p through `codec` in one thread, timestamps 0, 1, ...;
    `container`: av.open's format and options."""
    with av.open(str(path), "w", **container) as output:
        stream = output.add_stream(codec, rate=fps, options=codec_options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for index, frame in enumerate(frames):
            planes = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            planes.pts = index
            output.mux(stream.encode(planes))
        output.mux(stream.encode())


def _write_video(spec: WorldSpec, root: Path, class_name: str, group: int, clip: int) -> int:
    frames, parts = render_video(spec, class_name, group, clip)
    name = video_name(class_name, group, clip)
    folder = root / "videos" / class_name
    folder.mkdir(parents=True, exist_ok=True)
    write_mp4(folder / f"{name}.mp4", frames, spec.fps, spec.crf)
    if spec.write_video_masks:
        mask_folder = root / "masks" / class_name
        mask_folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(mask_folder / f"{name}.npz", parts=parts)
    return 1


_WRITERS = {
    "videos": _write_video,
    "objects": _write_objects,
    "scenes": _write_scenes,
    "bu101": _write_bu101,
    "stanford40": _write_stanford40,
    "parsing": _write_parsing,
}


def _run_task(task: tuple) -> tuple[str, int]:
    kind, spec, root, *keys = task
    return kind, _WRITERS[kind](spec, root, *keys)


def _tasks(spec: WorldSpec, root: Path) -> list[tuple]:
    """Independent units of work; image chunks first so no long task starts last."""
    tasks = [
        ("objects", spec, root, split, obj) for split in ("train", "val") for obj in OBJECT_NAMES
    ]
    tasks += [
        ("scenes", spec, root, split, scene) for split in ("train", "val") for scene in SCENE_NAMES
    ]
    tasks += [("bu101", spec, root, name) for name in spec.class_names]
    tasks += [("stanford40", spec, root, action) for action in STANFORD40_ACTIONS]
    for split in ("train", "val"):
        ids = _parsing_ids(spec, split)
        tasks += [("parsing", spec, root, split, ids[i : i + 100]) for i in range(0, len(ids), 100)]
    tasks += [
        ("videos", spec, root, name, group, clip)
        for name in spec.class_names
        for group in range(1, spec.groups_per_class + 1)
        for clip in range(1, spec.clips_per_group + 1)
    ]
    return tasks


# ---------------------------------------------------------------------------------------------
# List files.


def _write_lines(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())


def _write_ucf_lists(spec: WorldSpec, root: Path) -> tuple[int, int]:
    """classInd/trainlist01/testlist01 in the official format, CRLF line endings included."""
    lists = root / "ucfTrainTestlist"
    names = spec.class_names
    _write_lines(lists / "classInd.txt", [f"{i} {name}" for i, name in enumerate(names, 1)], "\r\n")
    train, test = [], []
    for label, name in enumerate(names, 1):
        for group in range(1, spec.groups_per_class + 1):
            for clip in range(1, spec.clips_per_group + 1):
                path = f"{name}/{video_name(name, group, clip)}.mp4"
                if group <= spec.test_groups:
                    test.append(path)
                else:
                    train.append(f"{path} {label}")
    _write_lines(lists / "trainlist01.txt", train, "\r\n")
    _write_lines(lists / "testlist01.txt", test, "\r\n")
    return len(train), len(test)


def _write_image_lists(spec: WorldSpec, root: Path) -> None:
    images = root / "images"
    _write_lines(
        images / "scenes" / "categories_places365.txt",
        [f"/{name[0]}/{name} {i}" for i, name in enumerate(SCENE_NAMES)],
    )
    splits = images / "stanford40" / "ImageSplits"
    counts, train_all, test_all = [], [], []
    for key, action in enumerate(STANFORD40_ACTIONS):
        count = spec.stanford40_train_per_class + spec.stanford40_test_per_class
        order = _rng(spec, "splits", key).permutation(count) + 1  # file numbers, shuffled
        train = [f"{action}_{i:03d}.jpg" for i in sorted(order[: spec.stanford40_train_per_class])]
        test = [f"{action}_{i:03d}.jpg" for i in sorted(order[spec.stanford40_train_per_class :])]
        _write_lines(splits / f"{action}_train.txt", train)
        _write_lines(splits / f"{action}_test.txt", test)
        train_all += train
        test_all += test
        counts.append(f"{action}\t{count}")
    _write_lines(splits / "train.txt", train_all)
    _write_lines(splits / "test.txt", test_all)
    _write_lines(splits / "actions.txt", ["action_name\tnumber_of_images", *counts])
    for split in ("train", "val"):
        _write_lines(images / "parsing" / f"{split}_id.txt", _parsing_ids(spec, split))


# ---------------------------------------------------------------------------------------------
# The world.


def _check_decord_reads(spec: WorldSpec, folder: Path) -> None:
    """decord returns 4-channel frames for some widths (16, 24, 48, 72; dmlc/decord#93, #336),
    which ingest cannot use: refuse such a spec before spending minutes on it."""
    probe = folder / "probe.mp4"
    write_mp4(
        probe, np.zeros((2, spec.frame_height, spec.frame_width, 3), np.uint8), spec.fps, spec.crf
    )
    _check_decord_probe(spec, probe)


def _check_decord_probe(spec: WorldSpec | HmdbWorldSpec, probe: Path) -> None:
    """Decode frame 0 of `probe` with decord, delete it, and refuse a size decord misreads."""
    import decord

    shape = decord.VideoReader(str(probe))[0].shape
    probe.unlink()
    if tuple(shape) != (spec.frame_height, spec.frame_width, 3):
        raise ValueError(
            f"decord decodes {spec.frame_height}x{spec.frame_width} videos as {tuple(shape)} "
            f"(dmlc/decord#93): choose another frame_width, e.g. 64"
        )


def _spec_json(spec: WorldSpec | HmdbWorldSpec) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def _run_all(run, tasks: list[tuple], workers: int, desc: str) -> Counter:
    """`run` over `tasks` (in `workers` processes when more than 1); (kind, count) added up."""
    counts: Counter = Counter()
    with tqdm(total=len(tasks), desc=desc, unit="task", disable=None) as bar:
        if workers > 1:
            # spawn: no forked copies of a parent's threads (torch, tqdm) in the workers.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for kind, n in pool.imap_unordered(run, tasks, chunksize=4):
                    counts[kind] += n
                    bar.update()
        else:
            for task in tasks:
                kind, n = run(task)
                counts[kind] += n
                bar.update()
    return counts


def _build_world(out_dir: Path, spec: WorldSpec | HmdbWorldSpec, build) -> dict:
    """`build(folder)` (writes a world into `folder`, returns its counts) into a hidden sibling
    of `out_dir`, plus world.json; then the sibling replaces `out_dir`. Returns the counts."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        summary = build(tmp)
        world = {"spec": _spec_json(spec), "counts": summary, "sha256": world_fingerprint(tmp)}
        (tmp / "world.json").write_text(json.dumps(world, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "seconds": round(time.perf_counter() - start, 2)}


def generate_world(out_dir: Path, spec: WorldSpec, workers: int = 1) -> dict:
    """Write the whole world to `out_dir` (replacing it) and return a summary.

    The world is built in a hidden sibling folder and renamed into place at the end, so a killed
    run leaves no complete-looking `out_dir`. Results do not depend on `workers`.
    """

    def build(tmp: Path) -> dict:
        _check_decord_reads(spec, tmp)
        counts = _run_all(_run_task, _tasks(spec, tmp), workers, "synth")
        train, test = _write_ucf_lists(spec, tmp)
        _write_image_lists(spec, tmp)
        return {**{k: counts[k] for k in _WRITERS}, "train_videos": train, "test_videos": test}

    return _build_world(out_dir, spec, build)


def world_fingerprint(root: Path) -> str:
    """sha256 over every file of a generated world but world.json (relative path and bytes, in
    path order): equal fingerprints mean byte-identical worlds, whatever machine made them."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name != "world.json":
            digest.update(f"{name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first, then deleted
    (rename cannot replace a non-empty folder in one step)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, old / "previous")
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)


# ---------------------------------------------------------------------------------------------
# The second world: HMDB51's layout.
#
#   videos/<class>/<title>_<class>_<body>_<camera>_<people>_<view>_<quality>_<n>.avi
#   splits/<class>_test_split<1|2|3>.txt    one "<file name> <tag> " line per video, LF endings:
#                                           tag 1 train, 2 test, 0 unused
#   world.json                              spec, counts, fingerprint (as the first world's)
#
# As in HMDB51, <title> names the source video (here a group: actor, scene and held object), its
# clips are numbered from 0, and the titles carry the punctuation HMDB51's do (#, (, ), !, & and
# apostrophes), so that whatever reads HMDB51 meets them here first.

# Title words: the class's doing, and the actors' first names.
_TITLE_VERBS = {
    "balance": "Flamingo_Pose",
    "clap": "Clap_Hands",
    "jump": "Jump_Around",
    "kick": "Kick",
    "point": "Look_Over_There",
    "sit": "Sit_Down",
    "stretch_arms": "Morning_Stretch",
    "wave": "Wave_Goodbye",
}
_TITLE_OWNERS = ("Anna", "Ben", "Carla", "Dev", "Emma", "Felix", "Gus", "Hana", "Ivo", "Jules")
# One form per group in turn, so any 4 groups of a class use every character; every form holds
# the group number n, so titles never repeat within a class.
_TITLE_FORMS = (
    "{verb}!_({scene}_&_{thing})_{n}",  # Clap_Hands!_(Kitchen_&_Cup)_1
    "{owner}'s_{verb}#{n}",  # Ben's_Kick#2
    "{owner}_{scene}_{n:02d}",  # Carla_Beach_03: most HMDB51 titles are plain
    "#{n}_{owner}'s_{verb}_(HD)",  # #4_Dev's_Wave_Goodbye_(HD)
)


def _hmdb_look(spec: HmdbWorldSpec, class_name: str, group: int) -> Look:
    action = ALL_ACTIONS[HMDB_CLASSES[class_name]]
    return sample_look(
        _rng(spec, "hmdb_group", HMDB_CLASS_NAMES.index(class_name), group),
        spec,
        scene=action.scene,
        scene_correlation=spec.scene_correlation,
        obj=action.obj,
        object_correlation=spec.object_correlation,
    )


def hmdb_video_clip(spec: HmdbWorldSpec, class_name: str, group: int, clip: int) -> Clip:
    """The rendering parameters of clip `clip` (0-based, as in HMDB51's names) of group `group`
    (1-based) of class `class_name` of the second world."""
    rng = _rng(spec, "hmdb_clip", HMDB_CLASS_NAMES.index(class_name), group, clip)
    return sample_clip(rng, spec, HMDB_CLASSES[class_name], _hmdb_look(spec, class_name, group))


def render_hmdb_video(
    spec: HmdbWorldSpec, class_name: str, group: int, clip: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8 as encoded into the .avi, body-part masks (T, H, W) in 0..6."""
    return _render(spec, hmdb_video_clip(spec, class_name, group, clip))


def hmdb_title(spec: HmdbWorldSpec, class_name: str, group: int) -> str:
    """The source-video title of a group, e.g. `Clap_Hands!_(Kitchen_&_Cup)_1`."""
    look = _hmdb_look(spec, class_name, group)
    rng = _rng(spec, "hmdb_title", HMDB_CLASS_NAMES.index(class_name), group)
    return _TITLE_FORMS[(group - 1) % len(_TITLE_FORMS)].format(
        verb=_TITLE_VERBS[class_name],
        owner=_TITLE_OWNERS[rng.integers(len(_TITLE_OWNERS))],
        scene=look.scene.title(),
        thing=look.obj.title() if look.obj else "Bare_Hands",
        n=group,
    )


def hmdb_meta_tags(spec: HmdbWorldSpec, clip: Clip) -> str:
    """HMDB51's meta tags read off a clip's rendering: the whole body in view (f); camera motion
    (cm) when the clip pans at least half as far as any may, else none (nm; the shake is always
    there); one person (np1) seen from the front (fr); quality good / medium / bad (goo, med, bad)
    for the top, middle and bottom third of the log zoom range (how large the person is)."""
    moving = spec.camera_pan > 0 and abs(clip.pan[0]) >= 0.5 * spec.camera_pan
    zoom = np.log(clip.zoom) / np.log1p(spec.zoom_range) if spec.zoom_range > 0 else 0.0
    quality = "goo" if zoom > 1 / 3 else "bad" if zoom < -1 / 3 else "med"
    return f"f_{'cm' if moving else 'nm'}_np1_fr_{quality}"


def hmdb_video_name(spec: HmdbWorldSpec, class_name: str, group: int, clip: int) -> str:
    """The file stem, e.g. `Ben's_Kick#2_kick_f_cm_np1_fr_med_0`."""
    tags = hmdb_meta_tags(spec, hmdb_video_clip(spec, class_name, group, clip))
    return f"{hmdb_title(spec, class_name, group)}_{class_name}_{tags}_{clip}"


def hmdb_split_tags(spec: HmdbWorldSpec, class_name: str) -> dict[int, dict[int, int]]:
    """split number -> group -> tag (1 train, 2 test, 0 unused) for one class.

    The class's groups are shuffled once; split k tests the k-th block of test_groups groups of
    that order and leaves the next unused_groups unused (wrapping around), so the three splits
    differ, their test sets are disjoint when 3 x test_groups <= groups_per_class (as in 3-fold
    cross-validation), no group is on both sides of a split, and every group is train or test in
    some split (an unused group is in the next split's test block)."""
    groups = spec.groups_per_class
    order = _rng(spec, "hmdb_splits", HMDB_CLASS_NAMES.index(class_name)).permutation(groups) + 1
    tags = {}
    for number in HMDB_SPLITS:
        start = (number - 1) * spec.test_groups
        split = dict.fromkeys(range(1, groups + 1), 1)
        for i in range(spec.test_groups):
            split[int(order[(start + i) % groups])] = 2
        for i in range(spec.unused_groups):
            split[int(order[(start + spec.test_groups + i) % groups])] = 0
        tags[number] = split
    return tags


def write_avi(path: Path, frames: np.ndarray, fps: int, qscale: int) -> None:
    """MPEG-4 part 2 in AVI, as HMDB51's DivX/Xvid files, by FFmpeg's encoder (fourcc FMP4),
    with the same bytes on any machine, as write_mp4's.

    A fixed quantiser (qmin = qmax: rate control's floating point decides nothing), the integer
    C forward DCT and the simple IDCT (with FFmpeg's default `auto` both, its SIMD code gave other
    bytes than its C code for 8 of 8 test videos; with these, none did: measured by forcing the
    CPU flags off), one thread, `bitexact` (no encoder version in the stream or container), one
    key frame every 12 (FFmpeg's default), explicit timestamps, and YUV planes converted in
    integer arithmetic. Decoding is exact too: FFmpeg's SIMD and C decoders give the same YUV."""
    options = {
        "qmin": str(qscale),
        "qmax": str(qscale),
        "dct": "int",
        "idct": "simple",
        "flags": "+bitexact",
        "threads": "1",
    }
    _encode(path, frames, fps, "mpeg4", options, format="avi", options={"fflags": "+bitexact"})


def _write_hmdb_video(
    spec: HmdbWorldSpec, root: Path, class_name: str, group: int, clip: int
) -> int:
    frames, _ = render_hmdb_video(spec, class_name, group, clip)
    folder = root / "videos" / class_name
    folder.mkdir(parents=True, exist_ok=True)
    name = hmdb_video_name(spec, class_name, group, clip)
    write_avi(folder / f"{name}.avi", frames, spec.fps, spec.qscale)
    return 1


def _run_hmdb_task(task: tuple) -> tuple[str, int]:
    spec, root, *keys = task
    return "videos", _write_hmdb_video(spec, root, *keys)


def _write_hmdb_splits(spec: HmdbWorldSpec, root: Path) -> dict:
    """splits/<class>_test_split<k>.txt, lines sorted by file name; returns counts per split."""
    counts = {f"split{k}": {"train": 0, "test": 0, "unused": 0} for k in HMDB_SPLITS}
    kinds = {0: "unused", 1: "train", 2: "test"}
    for class_name in spec.class_names:
        names = {
            (group, clip): f"{hmdb_video_name(spec, class_name, group, clip)}.avi"
            for group in range(1, spec.groups_per_class + 1)
            for clip in range(spec.clips_per_group)
        }
        for number, tag_of in hmdb_split_tags(spec, class_name).items():
            lines = sorted(f"{name} {tag_of[group]} " for (group, _), name in names.items())
            _write_lines(root / "splits" / f"{class_name}_test_split{number}.txt", lines)
            for (group, _), _name in names.items():
                counts[f"split{number}"][kinds[tag_of[group]]] += 1
    return counts


def generate_hmdb_world(out_dir: Path, spec: HmdbWorldSpec, workers: int = 1) -> dict:
    """Write the second world to `out_dir` (replacing it, as generate_world) and return a summary.
    Results do not depend on `workers`."""

    def build(tmp: Path) -> dict:
        probe = tmp / "probe.avi"
        shape = (2, spec.frame_height, spec.frame_width, 3)
        write_avi(probe, np.zeros(shape, np.uint8), spec.fps, spec.qscale)
        _check_decord_probe(spec, probe)
        tasks = [
            (spec, tmp, class_name, group, clip)
            for class_name in spec.class_names
            for group in range(1, spec.groups_per_class + 1)
            for clip in range(spec.clips_per_group)
        ]
        counts = _run_all(_run_hmdb_task, tasks, workers, "synth hmdb51")
        return {"videos": counts["videos"], **_write_hmdb_splits(spec, tmp)}

    return _build_world(out_dir, spec, build)


# ---------------------------------------------------------------------------------------------
# Sample figure.

PART_COLORS = np.array(
    [
        (0, 0, 0),
        (230, 60, 60),
        (60, 120, 230),
        (60, 200, 90),
        (240, 200, 40),
        (190, 80, 220),
        (40, 210, 210),
    ],
    float,
)


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _check_world_spec(raw_dir: Path, spec: WorldSpec | HmdbWorldSpec) -> None:
    world = json.loads((raw_dir / "world.json").read_text())
    if world["spec"] != _spec_json(spec):
        raise DataError(f"{raw_dir / 'world.json'}: the world was generated from a different spec")


def write_sample_figure(raw_dir: Path, out_png: Path, spec: WorldSpec, num_times: int = 6) -> None:
    """PNG with one row per class: frames across time of its g01_c01 video, then the body-part
    mask of the middle frame over that frame (masks re-rendered from `spec`)."""
    raw_dir = Path(raw_dir)
    _check_world_spec(raw_dir, spec)
    names = [
        line.split()[1]
        for line in (raw_dir / "ucfTrainTestlist" / "classInd.txt").read_text().splitlines()
    ]
    rows = [
        (
            name,
            raw_dir / "videos" / name / f"{video_name(name, 1, 1)}.mp4",
            lambda name=name: render_video(spec, name, 1, 1)[1],
        )
        for name in names
    ]
    title = "Synthetic action world: one video per class (g01_c01)"
    _plot_samples(rows, out_png, spec, num_times, title)


def write_hmdb_sample_figure(
    raw_dir: Path, out_png: Path, spec: HmdbWorldSpec, num_times: int = 6
) -> None:
    """write_sample_figure for the second world: one row per class, its group 1 clip 0."""
    raw_dir = Path(raw_dir)
    _check_world_spec(raw_dir, spec)
    rows = [
        (
            name,
            raw_dir / "videos" / name / f"{hmdb_video_name(spec, name, 1, 0)}.avi",
            lambda name=name: render_hmdb_video(spec, name, 1, 0)[1],
        )
        for name in spec.class_names
    ]
    title = "Second synthetic world (HMDB51 layout): one video per class (group 1, clip 0)"
    _plot_samples(rows, out_png, spec, num_times, title)


def _plot_samples(
    rows: list, out_png: Path, spec: WorldSpec | HmdbWorldSpec, num_times: int, title: str
) -> None:
    """rows: (class name, video file, function returning its re-rendered part masks)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    aspect = spec.frame_width / spec.frame_height
    fig = Figure(figsize=(1.3 * aspect * (num_times + 1) + 1.5, 1.3 * len(rows) + 1.2))
    axes = fig.subplots(len(rows), num_times + 1, squeeze=False)
    for row, (name, video, masks) in enumerate(rows):
        frames = _decode(video)
        picks = np.linspace(0, len(frames) - 1, num_times).round().astype(int)
        mid = len(frames) // 2
        parts = masks()[mid]
        overlay = np.where(
            parts[..., None] > 0, 0.4 * frames[mid] + 0.6 * PART_COLORS[parts], frames[mid]
        )
        for col, image in enumerate([*(frames[k] for k in picks), overlay.astype(np.uint8)]):
            ax = axes[row, col]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(
                    f"frame {picks[col]}" if col < num_times else f"parts, frame {mid}", fontsize=9
                )
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    handles = [
        Patch(color=PART_COLORS[i] / 255, label=PART_NAMES[i]) for i in range(1, len(PART_NAMES))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    inch = 1 / fig.get_figheight()  # margins in inches, whatever the number of classes
    fig.suptitle(title, y=1 - 0.15 * inch)
    fig.subplots_adjust(left=0.15, right=0.98, top=1 - 0.8 * inch, bottom=0.5 * inch)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
