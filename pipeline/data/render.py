"""Numpy renderer of the synthetic action world: poses, body parts, scenes, held objects, camera.

Everything is drawn in world coordinates (y up; at zoom 1 the frame spans y in [-1, 1]) on a
per-pixel coordinate grid, so the camera (zoom, pan, shake) moves the whole scene consistently and
the body-part mask is exact: a pixel's label is the part whose shape was painted last over it.

A person is a front-facing 2-D skeleton in body units (pelvis at the origin, about 1 unit tall).
Each limb segment has an angle (degrees from hanging straight down; positive = away from the
body's midline, a lower segment's angle is relative to its upper one) and a foreshortening factor
(1 = in the image plane, smaller = pointing towards the camera). "L"/"R" are the viewer's
left/right, so a mirrored pose is just the L and R entries swapped.
"""

import colorsys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TAU = 2 * np.pi

# Pascal-Person-Part labels, the parsing teacher's output space.
PART_NAMES = (
    "Background",
    "Head",
    "Torso",
    "Upper Arms",
    "Lower Arms",
    "Upper Legs",
    "Lower Legs",
)
HEAD, TORSO, UPPER_ARMS, LOWER_ARMS, UPPER_LEGS, LOWER_LEGS = range(1, 7)

# Body proportions in body units (total height about 1).
TORSO_LEN = 0.30
NECK_LEN = 0.04
HEAD_RX, HEAD_RY = 0.07, 0.085
SHOULDER_HALF = 0.085
TORSO_TOP_HALF, TORSO_BOTTOM_HALF = 0.10, 0.08
HIP_HALF = 0.05
UPPER_ARM, LOWER_ARM = 0.16, 0.15
UPPER_LEG, LOWER_LEG = 0.24, 0.24
ARM_RADIUS, LEG_RADIUS = 0.045, 0.055
HELD_OBJECT_RADIUS = 0.09

LIMBS = ("ua_L", "la_L", "ua_R", "la_R", "ul_L", "ll_L", "ul_R", "ll_R")
STAND_ANGLE = {"ua": 8.0, "la": 4.0, "ul": 3.0, "ll": -1.0}


# ---------------------------------------------------------------------------------------------
# Pose table: joint angles as functions of the phase p (cyclic actions, 1 = one cycle) or of the
# progress q in [0, 1] (one-shot actions). Each returns only the entries that differ from standing.


def _up01(p):
    """0 at p = 0, 1 at p = 0.5, back to 0 at p = 1: a smooth there-and-back cycle."""
    return 0.5 - 0.5 * np.cos(TAU * p)


def _raise_arms(p):
    arm = 140 + 30 * _up01(p)
    return {"ua_L": arm, "ua_R": arm, "la_L": 12, "la_R": 12}


def _wave(p):
    # Upper arm raised, forearm swinging from side to side.
    return {"ua_R": 125, "la_R": 20 + 40 * np.sin(TAU * p)}


def _punch(p):
    # Fists start at the chin (forearm folded up and inwards) and strike out sideways, alternating.
    pose = {"ul_L": 10, "ul_R": 10}
    for side, extend in (
        ("L", np.maximum(np.sin(TAU * p), 0)),
        ("R", np.maximum(-np.sin(TAU * p), 0)),
    ):
        pose["ua_" + side] = 25 + 65 * extend
        pose["la_" + side] = -160 * (1 - extend)
    return pose


def _kick(p):
    extend = np.maximum(np.sin(TAU * p), 0) ** 0.8
    return {
        "ul_R": 3 + 70 * extend,
        "ll_R": -25 * np.sin(np.pi * extend),  # knee bends on the way up, straight at full kick
        "ul_L": 6,
        "ua_L": 45,
        "ua_R": 45,  # arms out for balance
    }


def _squat(p):
    depth = _up01(p)
    thigh = 3 + 50 * depth
    pose = {}
    for side in "LR":
        pose |= {
            f"ul_{side}": thigh,  # knees out...
            f"fs_ul_{side}": 1 - 0.75 * depth,  # ...and towards the camera
            f"ll_{side}": -thigh,  # shins stay vertical
            f"ua_{side}": 8 + 80 * depth,  # arms reach forwards (short in a front view)
            f"fs_ua_{side}": 1 - 0.7 * depth,
            f"fs_la_{side}": 1 - 0.7 * depth,
        }
    return pose


def _jumping_jack(p):
    spread = _up01(p)
    pose = {"lift": 0.05 * np.abs(np.sin(TAU * p))}
    for side in "LR":
        pose |= {f"ua_{side}": 10 + 155 * spread, f"la_{side}": 8, f"ul_{side}": 3 + 20 * spread}
    return pose


def _clap(p):
    # Forearms horizontal and inwards so the hands meet at the midline; when apart they point at
    # the camera (foreshortened), which moves the hands outwards in the image.
    apart = _up01(p)
    pose = {}
    for side in "LR":
        pose |= {
            f"ua_{side}": 28,
            f"la_{side}": -118,
            f"fs_ua_{side}": 0.9,
            f"fs_la_{side}": 1 - 0.6 * apart,
        }
    return pose


def _jump(p):
    q = np.mod(p, 1.0)
    air = np.where((q > 0.3) & (q < 0.8), np.sin(np.pi * (q - 0.3) / 0.5), 0.0)
    crouch = sum(np.exp(-(((q - c) / 0.07) ** 2)) for c in (0.2, 0.9, -0.1))
    pose = {"lift": 0.3 * air}
    for side in "LR":
        pose |= {
            f"ul_{side}": 3 + 25 * crouch + 15 * air,
            f"fs_ul_{side}": 1 - 0.55 * crouch - 0.3 * air,
            f"ll_{side}": -(25 * crouch + 15 * air),
            f"ua_{side}": 15 - 10 * crouch + 140 * air,  # arms swing up in flight
        }
    return pose


def _walk(p):
    # Front-facing walk: a knee comes towards the camera (short thigh, raised foot) while the
    # opposite arm swings forwards. Pose(p + 0.5) is the mirror of pose(p), so a still frame does
    # not tell walking left from walking right; only the translation does.
    lift_l = np.maximum(np.sin(TAU * p), 0)
    lift_r = np.maximum(-np.sin(TAU * p), 0)
    return {
        "ul_L": 3 + 5 * lift_l,
        "ul_R": 3 + 5 * lift_r,
        "fs_ul_L": 1 - 0.5 * lift_l,
        "fs_ul_R": 1 - 0.5 * lift_r,
        "fs_ua_L": 1 - 0.3 * lift_r,
        "fs_ua_R": 1 - 0.3 * lift_l,
        "lift": 0.02 * np.abs(np.sin(2 * TAU * p)),
    }


def _sit(q):
    # Standing (q = 0) to seated without a chair (q = 1): thighs towards the camera, hands on knees,
    # torso leaning forwards (shorter) mid-way. Stand up is exactly this reversed in time.
    pose = {"torso_fs": 1 - 0.25 * np.sin(np.pi * q)}
    for side in "LR":
        pose |= {
            f"ul_{side}": 3 + 22 * q,  # knees apart
            f"fs_ul_{side}": 1 - 0.9 * q,
            f"ll_{side}": -1 - 22 * q,
            f"ua_{side}": 8 + 15 * q,
            f"fs_ua_{side}": 1 - 0.35 * q,
            f"la_{side}": -30 * q,
        }
    return pose


def _pointing(p):
    return {"ua_R": 90 + 3 * np.sin(TAU * p), "la_R": 0}


def _stretching_arms(p):
    arm = 92 + 4 * np.sin(TAU * p)
    return {"ua_L": arm, "ua_R": arm, "la_L": 0, "la_R": 0, "ul_L": 8, "ul_R": 8}


def _hands_on_hips(p):
    return {"ua_L": 45, "ua_R": 45, "la_L": -85, "la_R": -85}


def _standing_on_one_leg(p):
    return {"ul_R": 10, "fs_ul_R": 0.35, "ll_R": -5, "ua_L": 35 + 5 * np.sin(TAU * p), "ua_R": 35}


@dataclass(frozen=True)
class Action:
    """One row of the pose table."""

    pose: Callable[[np.ndarray], dict]  # joint angles from phase (cyclic) or progress (one-shot)
    cyclic: bool = True  # repeats with `cycles` cycles per clip at speed 1, else a one-shot
    cycles: float = 1.0
    duration: float = 0.45  # one-shot: fraction of the clip the transition takes at speed 1
    reverse: bool = False  # one-shot played backwards (stand up = sit down reversed)
    travel: int = 0  # -1 walks towards the viewer's left, +1 right
    mirror: bool = False  # may be performed with either arm/leg
    scene: str = ""  # the scene this action prefers (video actions)
    obj: str = ""  # the held object this action prefers (video actions)


# Video classes. Motion-only pairs (WalkLeft/WalkRight, SitDown/StandUp) share their preferred
# scene and object, so context cannot separate them either.
VIDEO_ACTIONS = {
    "Clap": Action(_clap, cycles=3.0, scene="kitchen", obj="cup"),
    "Jump": Action(_jump, cycles=1.5, scene="forest_path", obj="cone"),
    "JumpingJack": Action(_jumping_jack, cycles=2.0, scene="snowfield", obj="ring"),
    "Kick": Action(_kick, cycles=1.5, mirror=True, scene="beach", obj="ball"),
    "Punch": Action(_punch, cycles=1.5, scene="boxing_ring", obj="box"),
    "RaiseArms": Action(_raise_arms, cycles=1.0, scene="beach", obj="flag"),
    "SitDown": Action(_sit, cyclic=False, scene="office", obj="diamond"),
    "Squat": Action(_squat, cycles=1.5, scene="bedroom", obj="dumbbell"),
    "StandUp": Action(_sit, cyclic=False, reverse=True, scene="office", obj="diamond"),
    "WalkLeft": Action(_walk, cycles=2.0, travel=-1, scene="street", obj="stick"),
    "WalkRight": Action(_walk, cycles=2.0, travel=1, scene="street", obj="stick"),
    "Wave": Action(_wave, cycles=2.5, mirror=True, scene="kitchen", obj="cross"),
}


def motion_only_actions() -> list[str]:
    """Video actions that share their pose with another (WalkLeft/WalkRight, SitDown/StandUp):
    only motion or temporal order tells them apart."""
    by_pose: dict = {}
    for name, action in VIDEO_ACTIONS.items():
        by_pose.setdefault(action.pose, []).append(name)
    return sorted(name for names in by_pose.values() if len(names) > 1 for name in names)


# Poses that only appear in still images (Stanford40-style extra actions).
STILL_ACTIONS = {
    "pointing": Action(_pointing, mirror=True),
    "stretching_arms": Action(_stretching_arms),
    "hands_on_hips": Action(_hands_on_hips),
    "standing_on_one_leg": Action(_standing_on_one_leg, mirror=True),
}
POSES = VIDEO_ACTIONS | STILL_ACTIONS


def _point_at(p):
    # Points at something and lowers the arm again, once a cycle: the straight arm rises to the
    # horizontal (the still `pointing` pose), stays there a moment, and drops.
    up = np.clip(1.5 * _up01(p) - 0.25, 0.0, 1.0)
    return {"ua_R": 8 + 84 * up, "la_R": 4 - 4 * up}


def _stretch_arms(p):
    # A warm-up stretch, once a cycle: both straight arms rise sideways to the horizontal (the
    # still `stretching_arms` pose), then swing forwards towards the camera (foreshortened) and
    # back, feet a little apart.
    reach = _up01(p)
    side = np.clip(2 * reach, 0.0, 1.0)
    forwards = np.clip(2 * reach - 1, 0.0, 1.0)
    pose = {}
    for s in "LR":
        pose |= {
            f"ua_{s}": 8 + 84 * side,
            f"la_{s}": 4 - 4 * side,
            f"fs_ua_{s}": 1 - 0.7 * forwards,
            f"fs_la_{s}": 1 - 0.7 * forwards,
            f"ul_{s}": 3 + 5 * side,
        }
    return pose


def _balance(p):
    # Standing on one leg: the knee comes up towards the camera and out, the foot tucked in
    # towards the standing knee (the still `standing_on_one_leg` pose, held higher), and stays up
    # for most of a cycle while the arms, held out, wobble for balance.
    lift = np.clip(2.5 * _up01(p) - 0.5, 0.0, 1.0)
    wobble = lift * np.sin(3 * TAU * p)
    return {
        "ul_R": 3 + 27 * lift,
        "fs_ul_R": 1 - 0.55 * lift,
        "ll_R": -1 - 60 * lift,
        "ua_L": 8 + 40 * lift + 12 * wobble,
        "ua_R": 8 + 40 * lift - 12 * wobble,
    }


# Video actions that only the second synthetic world (HMDB51 layout, pipeline.data.synth) shows:
# the still-image poses above set in motion. A table of its own so that VIDEO_ACTIONS, POSES and
# with them every file of the first world stay as they were. Their preferred scenes and objects
# are ones that the second world's five other classes (the first world's) do not prefer.
EXTRA_VIDEO_ACTIONS = {
    "Balance": Action(_balance, cycles=1.0, mirror=True, scene="snowfield", obj="ring"),
    "PointAt": Action(_point_at, cycles=1.5, mirror=True, scene="street", obj="stick"),
    "StretchArms": Action(_stretch_arms, cycles=1.0, scene="bedroom", obj="dumbbell"),
}
# Every action a Clip may name (POSES alone is what the first world draws from).
ALL_ACTIONS = POSES | EXTRA_VIDEO_ACTIONS


# ---------------------------------------------------------------------------------------------
# Scenes (a Places analogue) and held objects (an ImageNet analogue).


@dataclass(frozen=True)
class SceneStyle:
    colors: tuple  # top, bottom, top accent, bottom accent (RGB 0-255)
    top: str  # pattern above the horizon
    bottom: str  # pattern below the horizon (the floor the person stands on)
    horizon: float  # typical horizon height (world y)


SCENES = {
    "beach": SceneStyle(
        ((140, 195, 235), (222, 200, 150), (40, 110, 185), (195, 170, 115)), "sea", "waves", -0.1
    ),
    "bedroom": SceneStyle(
        ((225, 185, 195), (150, 100, 60), (245, 230, 235), (105, 65, 35)), "stripes", "planks", 0.0
    ),
    "boxing_ring": SceneStyle(
        ((30, 30, 40), (50, 90, 170), (200, 30, 30), (35, 65, 135)), "ropes", "plain", -0.2
    ),
    "forest_path": SceneStyle(
        ((40, 95, 45), (125, 95, 60), (95, 60, 30), (90, 70, 40)), "trunks", "speckle", 0.05
    ),
    "kitchen": SceneStyle(
        ((235, 225, 195), (205, 205, 205), (165, 155, 135), (45, 45, 45)), "tiles", "checker", 0.0
    ),
    "office": SceneStyle(
        ((210, 200, 175), (90, 100, 120), (250, 250, 250), (65, 75, 95)), "board", "speckle", -0.05
    ),
    "snowfield": SceneStyle(
        ((185, 200, 225), (240, 242, 248), (225, 230, 240), (205, 212, 228)), "haze", "waves", 0.1
    ),
    "street": SceneStyle(
        ((130, 130, 135), (60, 60, 65), (45, 50, 65), (230, 230, 230)), "windows", "lane", 0.05
    ),
}
SCENE_NAMES = tuple(sorted(SCENES))


def _frac(v):
    return v - np.floor(v)


def _cell_noise(i, j):
    """Pseudo-random value in [0, 1) per integer cell: texture fixed to the world, not pixels.

    An integer hash (32-bit multiply-xorshift), not the shader idiom frac(sin(x) * 43758): that
    one turns a last-bit difference in sin, which numpy's SIMD code paths make from one CPU to
    another, into different pixels (0.6% of the tiny world's, measured)."""
    mask = np.uint64(0xFFFFFFFF)
    h = (np.asarray(i).astype(np.int64).astype(np.uint64) * np.uint64(73856093)) ^ (
        np.asarray(j).astype(np.int64).astype(np.uint64) * np.uint64(19349663)
    )
    for _ in range(2):
        h = (h ^ (h >> np.uint64(16))) & mask
        h = (h * np.uint64(0x45D9F3B)) & mask
    h ^= h >> np.uint64(16)
    return h.astype(np.float64) / 2.0**32


# Patterns map world x and height above the horizon h to an accent weight in [0, 1] (anything
# that broadcasts to the frame). f scales the texture's frequency and ph shifts it, per group, so
# scenes of one type vary.
def _sea(x, h, f, ph):
    return h < 0.25 + 0.03 * np.sin(TAU * (4 * f * x + ph[0]))


def _tiles(x, h, f, ph):
    return (_frac(4 * f * x + ph[0]) < 0.12) | (_frac(4 * f * h + ph[1]) < 0.12)


def _windows(x, h, f, ph):
    return (_frac(3 * f * x + ph[0]) < 0.5) & (_frac(3 * f * h + ph[1]) < 0.5) & (h > 0.1)


def _waves(x, h, f, ph):
    return 0.5 + 0.5 * np.sin(TAU * (5 * f * h + 0.5 * np.sin(TAU * (f * x + ph[0]))))


def _checker(x, h, f, ph):
    return np.mod(np.floor(3 * f * x + ph[0]) + np.floor(3 * f * h + ph[1]), 2)


def _speckle(x, h, f, ph):
    return 0.8 * _cell_noise(np.floor(10 * f * x + 7 * ph[0]), np.floor(10 * f * h))


PATTERNS = {
    "plain": lambda x, h, f, ph: 0.0,
    "haze": lambda x, h, f, ph: np.clip(1 - h / 0.8, 0, 1) ** 2,
    "sea": _sea,
    "stripes": lambda x, h, f, ph: _frac(3 * f * x + ph[0]) < 0.5,
    "trunks": lambda x, h, f, ph: _frac(2 * f * x + ph[0]) < 0.18,
    "ropes": lambda x, h, f, ph: (_frac(4 * f * h + ph[0]) < 0.15) & (h < 0.9),
    "tiles": _tiles,
    "windows": _windows,
    "board": lambda x, h, f, ph: (np.abs(x - ph[0] + 0.5) < 0.4) & (h > 0.2) & (h < 0.6),
    "waves": _waves,
    "planks": lambda x, h, f, ph: _frac(6 * f * h + ph[0]) < 0.15,
    "checker": _checker,
    "speckle": _speckle,
    "lane": lambda x, h, f, ph: (np.abs(h + 0.45) < 0.035) & (_frac(2 * f * x + ph[0]) < 0.5),
}

# Held-object shapes in the object's own frame (v along the forearm, unit = object radius).
OBJECT_SHAPES = {
    "ball": lambda u, v: u * u + v * v <= 1,
    "box": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "cone": lambda u, v: (v >= -0.8) & (v <= 1 - 1.8 * np.abs(u)),
    "cross": lambda u, v: (
        ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    ),
    "cup": lambda u, v: (np.abs(v) <= 0.8) & (np.abs(u) <= 0.5 + 0.2 * (v + 0.8)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "dumbbell": lambda u, v: (
        ((np.abs(u) <= 0.2) & (np.abs(v) <= 1)) | (u * u + (np.abs(v) - 0.9) ** 2 <= 0.16)
    ),
    "flag": lambda u, v: (
        ((np.abs(u + 0.7) <= 0.15) & (np.abs(v) <= 1.3))
        | ((u >= -0.7) & (v >= 0.2) & (v <= 1.3 - 0.6 * (u + 0.7)))
    ),
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.25),
    "stick": lambda u, v: (np.abs(u) <= 0.22) & (np.abs(v) <= 1.5),
}
OBJECT_COLORS = {
    "ball": (220, 40, 40),
    "box": (140, 90, 40),
    "cone": (250, 140, 20),
    "cross": (40, 170, 60),
    "cup": (240, 240, 240),
    "diamond": (200, 40, 180),
    "dumbbell": (70, 70, 80),
    "flag": (40, 70, 220),
    "ring": (40, 200, 210),
    "stick": (230, 210, 40),
}
OBJECT_NAMES = tuple(sorted(OBJECT_SHAPES))

SKIN_TONES = ((255, 220, 185), (235, 190, 150), (200, 150, 110), (160, 110, 75), (110, 75, 50))
HAIR_COLORS = ((30, 25, 20), (90, 60, 30), (180, 140, 70), (120, 120, 120), (60, 40, 30))


# ---------------------------------------------------------------------------------------------
# What a rendering needs, with every random choice already made.


@dataclass(frozen=True)
class Look:
    """What a UCF-style group shares: the actor's appearance, the scene and the held object."""

    scene: str
    scene_colors: np.ndarray  # (4, 3) top, bottom, top accent, bottom accent
    scene_freq: float  # texture frequency multiplier
    scene_phase: tuple[float, float]  # texture offsets
    horizon: float  # world y of the horizon / floor edge
    texture: float  # strength of the scene's texture (0 = flat colours, 1 = full)
    skin: np.ndarray  # (3,) RGB
    hair: np.ndarray
    shirt: np.ndarray
    pants: np.ndarray
    long_sleeves: bool
    shorts: bool
    body_size: float  # body height in world units (the frame is 2 units high at zoom 1)
    obj: str  # held object name, "" for empty hands
    obj_color: np.ndarray


@dataclass(frozen=True)
class Clip:
    """One rendering: an action performed with a look, timing, placement and camera."""

    action: str  # key of ALL_ACTIONS
    look: Look
    person: bool = True  # False renders the scene alone
    phase0: float = 0.0  # cyclic actions: phase at the clip's start
    mid: float = 0.5  # one-shot actions: clip time of the transition's middle
    speed: float = 1.0  # playback speed: more cycles, faster transitions, longer walks
    amplitude: float = 1.0  # scales how far joints move from the standing pose
    mirrored: bool = False  # performed with the other arm/leg
    x_mid: float = 0.0  # world x of the pelvis at mid-clip
    walk_dist: float = 0.5  # world distance a walking action covers at speed 1
    ground: float = -0.84  # world y of the feet
    zoom: float = 1.0
    cam: tuple[float, float] = (0.0, 0.0)  # camera centre at mid-clip (world)
    pan: tuple[float, float] = (0.0, 0.0)  # camera motion over the whole clip (world)
    shake_px: float = 0.0  # per-frame camera shake std (pixels)
    shake_seed: int = 0
    brightness: float = 1.0  # global gain
    noise_std: float = 0.0  # per-pixel Gaussian noise std (0-255 scale)
    noise_seed: int = 0


def random_color(rng, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    hue = rng.random()
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb) * 255


# ---------------------------------------------------------------------------------------------
# Poses and skeletons.


def standing_pose(n: int) -> dict[str, np.ndarray]:
    pose = {k: np.full(n, STAND_ANGLE[k[:2]]) for k in LIMBS}
    pose |= {"fs_" + k: np.ones(n) for k in LIMBS}
    pose |= {"torso_fs": np.ones(n), "lift": np.zeros(n)}
    return pose


def mirror_pose(pose: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    swap = {"_L": "_R", "_R": "_L"}
    return {(k[:-2] + swap[k[-2:]] if k[-2:] in swap else k): v for k, v in pose.items()}


def action_pose(clip: Clip, times: np.ndarray) -> dict[str, np.ndarray]:
    """Joint angles, foreshortening and lift per frame; `times` are clip times in [0, 1)."""
    action = ALL_ACTIONS[clip.action]
    if action.cyclic:
        p = clip.phase0 + action.cycles * clip.speed * times
    else:
        duration = min(0.9, action.duration / clip.speed)
        q = np.clip((times - clip.mid + duration / 2) / duration, 0.0, 1.0)
        p = q * q * (3 - 2 * q)  # ease in and out
        if action.reverse:
            p = 1 - p
    stand = standing_pose(len(times))
    pose = dict(stand)
    for key, value in action.pose(p).items():
        pose[key] = np.broadcast_to(np.asarray(value, dtype=float), times.shape)
    # Amplitude scales the departure from standing, so a small actor still stands upright.
    for key in pose:
        if key.startswith("fs_") or key == "torso_fs":
            pose[key] = np.clip(1 - clip.amplitude * (1 - pose[key]), 0.05, 1.0)
        else:
            pose[key] = stand[key] + clip.amplitude * (pose[key] - stand[key])
    return mirror_pose(pose) if clip.mirrored else pose


def pose_deviation(pose: dict[str, np.ndarray]) -> np.ndarray:
    """How far each frame's pose is from standing: picks representative still frames."""
    n = len(pose["lift"])
    stand = standing_pose(n)
    angles = sum(np.abs(pose[k] - stand[k]) / 90 for k in LIMBS)
    shortening = sum(1 - pose["fs_" + k] for k in LIMBS) + 1 - pose["torso_fs"]
    return angles + shortening + 5 * pose["lift"]


def _direction(side: int, angle_deg: np.ndarray) -> np.ndarray:
    a = np.radians(angle_deg)
    return np.stack([side * np.sin(a), -np.cos(a)], axis=-1)


def skeleton(pose: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Joint positions (n, 2) in body units, pelvis at the origin, y up."""
    n = len(pose["lift"])
    zero = np.zeros(n)
    top = TORSO_LEN * pose["torso_fs"]
    joints = {
        "pelvis": np.stack([zero, zero], -1),
        "neck": np.stack([zero, top], -1),
        "head": np.stack([zero, top + NECK_LEN + HEAD_RY], -1),
    }
    for side, s in ((-1, "L"), (1, "R")):
        shoulder = np.stack([zero + side * SHOULDER_HALF, top - 0.02], -1)
        elbow = shoulder + UPPER_ARM * pose[f"fs_ua_{s}"][:, None] * _direction(
            side, pose[f"ua_{s}"]
        )
        forearm = _direction(side, pose[f"ua_{s}"] + pose[f"la_{s}"])
        hand = elbow + LOWER_ARM * pose[f"fs_la_{s}"][:, None] * forearm
        hip = np.stack([zero + side * HIP_HALF, zero], -1)
        knee = hip + UPPER_LEG * pose[f"fs_ul_{s}"][:, None] * _direction(side, pose[f"ul_{s}"])
        shin = _direction(side, pose[f"ul_{s}"] + pose[f"ll_{s}"])
        ankle = knee + LOWER_LEG * pose[f"fs_ll_{s}"][:, None] * shin
        joints |= {
            f"shoulder_{s}": shoulder,
            f"elbow_{s}": elbow,
            f"hand_{s}": hand,
            f"hip_{s}": hip,
            f"knee_{s}": knee,
            f"ankle_{s}": ankle,
        }
    return joints


def world_joints(clip: Clip, times: np.ndarray) -> dict[str, np.ndarray]:
    """Joints in world coordinates: feet on the ground (so crouching lowers the body), plus
    lift (jumps) and, for walking actions, a translation at constant speed."""
    pose = action_pose(clip, times)
    joints = skeleton(pose)
    lowest = np.minimum(joints["ankle_L"][:, 1], joints["ankle_R"][:, 1]) - LEG_RADIUS
    size = clip.look.body_size
    travel = ALL_ACTIONS[clip.action].travel
    root_x = clip.x_mid + travel * clip.walk_dist * clip.speed * (times - 0.5)
    root_y = clip.ground + size * (pose["lift"] - lowest)
    root = np.stack([root_x, root_y], -1)
    return {name: root + size * xy for name, xy in joints.items()}


# ---------------------------------------------------------------------------------------------
# Rasterising shapes on coordinate grids x (n, 1, W) and y (n, H, 1).


def _per_frame(v: np.ndarray) -> np.ndarray:
    return np.asarray(v)[:, None, None]


def capsule(x, y, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within `radius` of the segment a-b (a limb); a, b are (n, 2)."""
    ax, ay = _per_frame(a[:, 0]), _per_frame(a[:, 1])
    dx, dy = _per_frame(b[:, 0] - a[:, 0]), _per_frame(b[:, 1] - a[:, 1])
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    px, py = x - ax - t * dx, y - ay - t * dy
    return px * px + py * py <= radius * radius


def ellipse(x, y, centre: np.ndarray, rx: float, ry: float) -> np.ndarray:
    return ((x - _per_frame(centre[:, 0])) / rx) ** 2 + (
        (y - _per_frame(centre[:, 1])) / ry
    ) ** 2 <= 1


def convex_polygon(x, y, corners: list[np.ndarray]) -> np.ndarray:
    """Pixels inside a counter-clockwise convex polygon with (n, 2) corners."""
    inside = True
    for a, b in zip(corners, corners[1:] + corners[:1], strict=True):
        ax, ay = _per_frame(a[:, 0]), _per_frame(a[:, 1])
        ex, ey = _per_frame(b[:, 0] - a[:, 0]), _per_frame(b[:, 1] - a[:, 1])
        inside = inside & (ex * (y - ay) - ey * (x - ax) >= 0)
    return inside


def object_mask(obj: str, x, y, centre: np.ndarray, radius: float, angle: np.ndarray) -> np.ndarray:
    """Pixels of object `obj` centred at (n, 2) `centre`, its v axis pointing at `angle` (rad)."""
    dx = (x - _per_frame(centre[:, 0])) / radius
    dy = (y - _per_frame(centre[:, 1])) / radius
    c, s = _per_frame(np.cos(angle - np.pi / 2)), _per_frame(np.sin(angle - np.pi / 2))
    return OBJECT_SHAPES[obj](c * dx + s * dy, -s * dx + c * dy)


def camera_grid(clip: Clip, height: int, width: int, times: np.ndarray):
    """World coordinates of pixel centres: x (n, 1, W), y (n, H, 1)."""
    unit = height / 2  # pixels per world unit at zoom 1
    shake = np.random.default_rng(clip.shake_seed).normal(0.0, clip.shake_px, (len(times), 2))
    cx = clip.cam[0] + clip.pan[0] * (times - 0.5) + shake[:, 0] / unit / clip.zoom
    cy = clip.cam[1] + clip.pan[1] * (times - 0.5) + shake[:, 1] / unit / clip.zoom
    u = (np.arange(width) + 0.5 - width / 2) / unit / clip.zoom
    v = (np.arange(height) + 0.5 - height / 2) / unit / clip.zoom
    x = cx[:, None, None] + u[None, None, :]
    y = cy[:, None, None] - v[None, :, None]
    return x.astype(np.float32), y.astype(np.float32)  # float32 halves the rasterising cost


def paint_scene(look: Look, x, y) -> np.ndarray:
    """Background (n, H, W, 3) float RGB: a textured wall/sky above the horizon, floor below."""
    style = SCENES[look.scene]
    h = y - look.horizon
    shape = np.broadcast_shapes(x.shape, y.shape)
    top, bottom, top_accent, bottom_accent = look.scene_colors.astype(np.float32)
    w_top = PATTERNS[style.top](x, h, look.scene_freq, look.scene_phase)
    w_bottom = PATTERNS[style.bottom](x, h, look.scene_freq, look.scene_phase)
    w_top = np.broadcast_to(w_top, shape).astype(np.float32) * np.float32(look.texture)
    w_bottom = np.broadcast_to(w_bottom, shape).astype(np.float32) * np.float32(look.texture)
    upper = top + w_top[..., None] * (top_accent - top)
    lower = bottom + w_bottom[..., None] * (bottom_accent - bottom)
    return np.where(np.broadcast_to(h > 0, shape)[..., None], upper, lower)


def paint(image: np.ndarray, parts: np.ndarray, inside: np.ndarray, color, label: int) -> None:
    image[inside] = color
    parts[inside] = label


def _person_window(j: dict[str, np.ndarray], size: float, x, y) -> tuple[slice, slice]:
    """Rows and columns that can hold the person in any frame: painting only there is exact
    (nothing outside is touched) and several times cheaper than the whole frame."""
    points = np.concatenate(list(j.values()))
    margin = size * (HEAD_RY + 2.5 * HELD_OBJECT_RADIUS)
    (x0, y0), (x1, y1) = points.min(0) - margin, points.max(0) + margin
    cols = np.flatnonzero(((x >= x0) & (x <= x1)).any(axis=(0, 1)))
    rows = np.flatnonzero(((y >= y0) & (y <= y1)).any(axis=(0, 2)))
    if len(cols) == 0 or len(rows) == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def paint_person(image, parts, clip: Clip, times, x, y) -> None:
    """Draw the person back to front (legs, torso, head, arms, held object) into image and parts."""
    look = clip.look
    j = {name: xy.astype(np.float32) for name, xy in world_joints(clip, times).items()}
    size = look.body_size
    rows, cols = _person_window(j, size, x, y)
    image, parts, x, y = image[:, rows, cols], parts[:, rows, cols], x[:, :, cols], y[:, rows, :]
    arm_r, leg_r = ARM_RADIUS * size, LEG_RADIUS * size
    lower_leg_color = look.skin if look.shorts else look.pants
    lower_arm_color = look.shirt if look.long_sleeves else look.skin
    for s in "LR":
        paint(
            image,
            parts,
            capsule(x, y, j[f"knee_{s}"], j[f"ankle_{s}"], leg_r),
            lower_leg_color,
            LOWER_LEGS,
        )
    for s in "LR":
        paint(
            image,
            parts,
            capsule(x, y, j[f"hip_{s}"], j[f"knee_{s}"], leg_r),
            look.pants,
            UPPER_LEGS,
        )
    # Torso: a trapezoid from the shoulders to just below the hips.
    neck, pelvis = j["neck"], j["pelvis"]
    below = np.array([0.0, 0.03 * size])
    top_half, bottom_half = (
        np.array([TORSO_TOP_HALF * size, 0.0]),
        np.array([TORSO_BOTTOM_HALF * size, 0.0]),
    )
    corners = [
        pelvis - below - bottom_half,
        pelvis - below + bottom_half,
        neck + top_half,
        neck - top_half,
    ]
    paint(image, parts, convex_polygon(x, y, corners), look.shirt, TORSO)
    head = ellipse(x, y, j["head"], HEAD_RX * size, HEAD_RY * size)
    paint(image, parts, head, look.skin, HEAD)
    hair = head & (y > _per_frame(j["head"][:, 1]) + 0.35 * HEAD_RY * size)
    image[hair] = look.hair
    for s in "LR":
        paint(
            image,
            parts,
            capsule(x, y, j[f"shoulder_{s}"], j[f"elbow_{s}"], arm_r),
            look.shirt,
            UPPER_ARMS,
        )
    for s in "LR":
        paint(
            image,
            parts,
            capsule(x, y, j[f"elbow_{s}"], j[f"hand_{s}"], arm_r),
            lower_arm_color,
            LOWER_ARMS,
        )
    if look.obj:
        # Held in the viewer's-right hand, pointing along the forearm; a held object is not a
        # body part, so it is background in the parsing labels (as in Pascal-Person-Part).
        forearm = j["hand_R"] - j["elbow_R"]
        angle = np.arctan2(forearm[:, 1], forearm[:, 0])
        radius = HELD_OBJECT_RADIUS * size
        unit = forearm / (np.linalg.norm(forearm, axis=1, keepdims=True) + 1e-12)
        centre = j["hand_R"] + 0.6 * radius * unit
        paint(image, parts, object_mask(look.obj, x, y, centre, radius, angle), look.obj_color, 0)


def finish(image: np.ndarray, brightness: float, noise_std: float, noise_seed: int) -> np.ndarray:
    """Lighting gain and sensor noise, then quantise to uint8."""
    image = image * np.float32(brightness)
    if noise_std > 0:
        noise = np.random.default_rng(noise_seed).standard_normal(image.shape, dtype=np.float32)
        image += np.float32(noise_std) * noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_clip(clip: Clip, height: int, width: int, times) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, H, W, 3) uint8 and body-part masks (n, H, W) uint8 in 0..6 at clip `times`."""
    times = np.asarray(times, dtype=float)
    x, y = camera_grid(clip, height, width, times)
    image = paint_scene(clip.look, x, y)
    parts = np.zeros(image.shape[:3], np.uint8)
    if clip.person:
        paint_person(image, parts, clip, times, x, y)
    return finish(image, clip.brightness, clip.noise_std, clip.noise_seed), parts
