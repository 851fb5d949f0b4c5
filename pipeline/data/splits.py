"""Official train/test lists of UCF101 and HMDB51, labeled subsets, and validation carving.

The readers return one row per video file found on disk and listed in at least one split, plus a
list of rejections (listed but missing, in a folder that cannot be read, on disk but in no split).
They never decode videos.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from pipeline.errors import DataError

VIDEO_EXTENSIONS = frozenset({".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"})
SPLIT_NUMBERS = (1, 2, 3)
UCF_LIST_LINE = re.compile(r"^(.*?)(?:\s+\d+)?$")
UCF_NAME = re.compile(r"^v_.+_(g\d+)_c\d+$", re.IGNORECASE)
HMDB_SPLIT_FILE = re.compile(r"^(.+)_test_split(\d)\.txt$", re.IGNORECASE)
# HMDB51 names a clip <source video title>_<class>_<visible body part>_<camera motion>_<people>_
# <viewpoint>_<quality>_<clip number in that video>: the group is everything before the meta tags.
HMDB_NAME = re.compile(
    r"^(.+)_[fhul]_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:bad|med|goo)_\d+$", re.IGNORECASE
)
HMDB_TAGS = {"0": "", "1": "train", "2": "test"}


@dataclass(frozen=True, order=True)
class Rejection:
    """An input video left out of the shards; `path` is relative to the raw dataset root."""

    path: str
    reason: str


def read_ucf101(raw_dir: Path) -> tuple[pd.DataFrame, list[Rejection]]:
    """Parse `ucfTrainTestlist/` against the files under `videos/` (UCF101 layout)."""
    raw_dir = Path(raw_dir)
    list_dir = raw_dir / "ucfTrainTestlist"
    class_names = _read_class_index(list_dir / "classInd.txt")
    label_of = {name.lower(): label for label, name in enumerate(class_names)}
    disk = _DiskIndex(raw_dir / "videos")

    # listed file (as spelled in the list) -> {"split1": "train", ...}
    listing = _Listing()
    for number in SPLIT_NUMBERS:
        for kind in ("train", "test"):
            list_file = list_dir / f"{kind}list{number:02d}.txt"
            if not list_file.is_file():
                continue
            for line_number, line in _lines(list_file):
                # "<path> <label>" in trainlists, "<path>" in testlists; the label is redundant
                # with the folder, which decides the class below.
                listed = UCF_LIST_LINE.match(line).group(1).replace("\\", "/")
                folder = PurePosixPath(listed).parts[0] if "/" in listed else ""
                if folder.lower() not in label_of:
                    raise DataError(
                        f"{list_file}:{line_number}: class folder {folder!r} of {listed!r} "
                        "is not in classInd.txt"
                    )
                listing.add(disk, listed, list_file.name, f"split{number}", kind)
    if not listing.split_columns:
        raise DataError(f"{list_dir}: no trainlist0N.txt / testlist0N.txt files")

    def label_name_of(disk_path: str) -> str:
        # The list's folder decides the class (disk folders may differ in case).
        folder = PurePosixPath(listing.listed_as[disk_path]).parts[0]
        return class_names[label_of[folder.lower()]]

    return listing.frame(disk, label_name_of, class_names, group_of=_ucf_group)


def read_hmdb51(raw_dir: Path) -> tuple[pd.DataFrame, list[Rejection]]:
    """Parse `splits/<class>_test_splitN.txt` against `videos/<class>/<video>` (HMDB51 layout)."""
    raw_dir = Path(raw_dir)
    videos_dir = raw_dir / "videos"
    if not videos_dir.is_dir():
        raise DataError(f"{videos_dir}: folder of videos not found")
    class_names = sorted(d.name for d in videos_dir.iterdir() if d.is_dir())
    folder_of = {name.lower(): name for name in class_names}
    disk = _DiskIndex(videos_dir)

    split_dir = raw_dir / "splits"
    split_files = []
    if split_dir.is_dir():
        for path in split_dir.iterdir():
            match = HMDB_SPLIT_FILE.match(path.name)
            if match and int(match.group(2)) in SPLIT_NUMBERS:
                split_files.append((int(match.group(2)), match.group(1), path))
    if not split_files:
        raise DataError(f"{split_dir}: no <class>_test_splitN.txt files")

    listing = _Listing()
    for number, class_name, list_file in sorted(split_files):
        folder = folder_of.get(class_name.lower(), class_name)
        for line_number, line in _lines(list_file):
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or parts[1] not in HMDB_TAGS:
                raise DataError(
                    f"{list_file}:{line_number}: expected '<video> <0|1|2>', got {line!r}"
                )
            listing.add(
                disk, f"{folder}/{parts[0]}", list_file.name, f"split{number}", HMDB_TAGS[parts[1]]
            )

    def label_name_of(disk_path: str) -> str:
        return PurePosixPath(disk_path).parts[0]

    return listing.frame(disk, label_name_of, class_names, group_of=_hmdb_group)


def labeled_subsets(
    df: pd.DataFrame, split_col: str, percents=(1, 5, 10, 20, 50), seed: int = 0
) -> pd.DataFrame:
    """Add bool columns `labeled_<p>`: class-stratified, nested, seeded subsets of the train rows.

    Each class's train rows are shuffled once; the p% subset is the first max(1, round(p% of the
    class)) of that order, so smaller subsets are always inside larger ones.
    """
    out = df.copy()
    rng = np.random.default_rng(seed)
    train = df[df[split_col] == "train"].sort_values("path")
    order = {}
    for label, rows in train.groupby("label", sort=True):
        order[label] = rows.index.to_numpy()[rng.permutation(len(rows))]
    for percent in percents:
        chosen = pd.Series(False, index=df.index)
        for rows in order.values():
            count = min(len(rows), max(1, int(np.floor(len(rows) * percent / 100 + 0.5))))
            chosen[rows[:count]] = True
        out[f"labeled_{percent}"] = chosen
    return out


def carve_validation(df: pd.DataFrame, split_col: str, fraction: float, seed: int) -> pd.Series:
    """Mark about `fraction` of each class's train rows as validation, whole groups at a time.

    Classes are visited in a seeded order; each picks random groups holding its train rows until
    its target is met. A group is taken whole (all its train rows, of every class), so a group
    never straddles train and validation even when group names are shared across classes (UCF's
    g08 exists in every class). A group is skipped if taking it would leave a class no train row.
    """
    rng = np.random.default_rng(seed)
    train = df.loc[df[split_col] == "train", ["label", "group"]]
    is_val = pd.Series(False, index=df.index)
    if fraction <= 0 or train.empty:
        return is_val
    in_val = np.zeros(len(train), dtype=bool)
    labels, groups = train["label"].to_numpy(), train["group"].to_numpy()
    class_order = np.unique(labels)
    for label in class_order[rng.permutation(len(class_order))]:
        of_class = labels == label
        target = max(1, int(np.floor(of_class.sum() * fraction + 0.5)))
        candidates = np.unique(groups[of_class])
        for group in candidates[rng.permutation(len(candidates))]:
            if in_val[of_class].sum() >= target:
                break
            in_group = groups == group  # may be taken already (by another class): a no-op
            taken = in_val | in_group
            if not set(labels[in_group]) <= set(labels[~taken]):  # would empty some class
                continue
            in_val = taken
    is_val[train.index] = in_val
    return is_val


def _read_class_index(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: class index not found")
    names = {}
    line_of_number: dict[int, int] = {}
    line_of_name: dict[str, tuple[int, str]] = {}  # classes are matched ignoring case
    for line_number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path}:{line_number}: expected '<number> <ClassName>', got {line!r}")
        number, name = int(parts[0]), parts[1]
        # A second entry would silently shift or drop labels: refuse it where it stands.
        if number in line_of_number:
            raise DataError(
                f"{path}:{line_number}: class number {number} is given twice "
                f"(also on line {line_of_number[number]})"
            )
        if name.lower() in line_of_name:
            first_line, first_name = line_of_name[name.lower()]
            raise DataError(
                f"{path}:{line_number}: class {name!r} is named twice (also on line "
                f"{first_line} as {first_name!r}; class names are matched ignoring case)"
            )
        names[number] = name
        line_of_number[number], line_of_name[name.lower()] = line_number, (line_number, name)
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(f"{path}: class numbers are not 1..{len(names)}")
    return [names[number] for number in sorted(names)]


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; CRLF, trailing spaces and a BOM are dropped."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_number = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line_number}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
            "save the list as UTF-8"
        ) from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _ucf_group(video_id: str) -> str:
    match = UCF_NAME.match(video_id)
    return match.group(1).lower() if match else video_id


def _hmdb_group(video_id: str) -> str:
    """The source video of an HMDB51 clip (`<title>_<class>`): its clips share actor and scene,
    and HMDB51's splits keep them on one side, so the validation carve must too. A name without
    HMDB51's meta tags is its own group."""
    match = HMDB_NAME.match(video_id)
    return match.group(1) if match else video_id


class _DiskIndex:
    """Video files under a `videos/` folder, looked up case-insensitively.

    A list path is matched exactly ignoring case first; failing that, ignoring the extension too
    (lists name .avi where a re-encoded copy holds .mp4), but only if that match is unique.
    Folders that cannot be listed are kept with the reason, so that their videos are reported as
    unreadable rather than missing.
    """

    def __init__(self, videos_dir: Path):
        if not videos_dir.is_dir():
            raise DataError(f"{videos_dir}: folder of videos not found")
        self.unreadable: dict[str, str] = {}  # folder as "videos/<folder>" -> why
        paths = []

        def unreadable(err: OSError) -> None:
            folder = Path(err.filename).relative_to(videos_dir.parent)
            self.unreadable[folder.as_posix()] = err.strerror

        for folder, _, files in os.walk(videos_dir, onerror=unreadable, followlinks=True):
            for name in files:
                path = Path(folder, name)
                is_video = path.suffix.lower() in VIDEO_EXTENSIONS and not name.startswith(".")
                if is_video and path.is_file():  # is_file: not a broken link
                    paths.append(path.relative_to(videos_dir).as_posix())
        self.paths = sorted(paths)
        self._by_name = {p.lower(): p for p in self.paths}
        self._by_stem: dict[str, list[str]] = {}
        for p in self.paths:
            self._by_stem.setdefault(_without_suffix(p).lower(), []).append(p)

    def find(self, listed: str) -> str | None:
        if listed.lower() in self._by_name:
            return self._by_name[listed.lower()]
        same_stem = self._by_stem.get(_without_suffix(listed).lower(), [])
        return same_stem[0] if len(same_stem) == 1 else None

    def unreadable_reason(self, listed: str) -> str | None:
        """Why `listed` was not found, if a folder holding it could not be listed."""
        path = f"videos/{listed}".lower()
        for folder, why in self.unreadable.items():
            if path.startswith(folder.lower() + "/"):
                return f"unreadable: cannot list folder {folder} ({why})"
        return None


def _without_suffix(path: str) -> str:
    return str(PurePosixPath(path).with_suffix(""))


class _Listing:
    """Accumulates split membership of disk files while list files are read."""

    def __init__(self):
        self.splits: dict[str, dict[str, str]] = {}  # disk path -> split column -> train/test/""
        self.listed_as: dict[str, str] = {}  # disk path -> first spelling in a list
        self.split_columns: set[str] = set()
        self.rejected: dict[str, str] = {}  # videos/<listed path> -> reason

    def add(self, disk: _DiskIndex, listed: str, list_name: str, split_col: str, value: str):
        self.split_columns.add(split_col)
        found = disk.find(listed)
        if found is None:
            reason = disk.unreadable_reason(listed) or f"listed in {list_name} but missing"
            self.rejected.setdefault(f"videos/{listed}", reason)
            return
        self.listed_as.setdefault(found, listed)
        previous = self.splits.setdefault(found, {}).setdefault(split_col, value)
        if previous != value:
            self.rejected.setdefault(
                f"videos/{found}",
                f"listed as both {previous or 'unused'} and {value or 'unused'} in {split_col}",
            )

    def frame(self, disk: _DiskIndex, label_name_of, class_names: list[str], group_of):
        label_of = {name: label for label, name in enumerate(class_names)}
        columns = sorted(self.split_columns)
        rows = []
        rejected = dict(self.rejected)
        for path in disk.paths:
            splits = self.splits.get(path, {})
            if f"videos/{path}" in rejected:
                continue
            if not any(splits.values()):
                rejected[f"videos/{path}"] = "in no split"
                continue
            video_id = PurePosixPath(path).stem
            label_name = label_name_of(path)
            rows.append(
                {
                    "path": f"videos/{path}",
                    "label": label_of[label_name],
                    "label_name": label_name,
                    "group": group_of(video_id),
                    "video_id": video_id,
                    **{col: splits.get(col, "") for col in columns},
                }
            )
        df = pd.DataFrame(
            rows, columns=["path", "label", "label_name", "group", "video_id", *columns]
        )
        df = df.astype({"label": "int64"})
        rejections = [Rejection(path, reason) for path, reason in sorted(rejected.items())]
        return df, rejections
