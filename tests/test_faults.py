"""Faults on the data side, replayed: each ends in one line naming the file (or key) at fault, and
nothing good is lost or taken as complete."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import io as io_module
from pipeline.config import validate_params
from pipeline.data import ingest as ingest_module
from pipeline.data.shards import ShardStore
from pipeline.data.splits import read_ucf101
from pipeline.errors import ConfigError, DataError
from pipeline.inspect import describe
from pipeline.io import atomic_path, partial_folder, write_json_atomic
from pipeline.teachers.features import FeatureCache
from tests.test_features import build
from tests.test_ingest import GOOD, _listed_name, _video_name, _write_lists, run_ingest, write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Six good videos in UCF101 layout (the ingest tests' world); tests copy it to change it."""
    raw = tmp_path_factory.mktemp("raw")
    for cls, group, clip, frames in GOOD:
        write_video(raw / "videos" / _video_name(cls, group, clip), frames)
    train = [_listed_name(c, g, k) for c, g, k, _ in GOOD if g < 3]
    test = [_listed_name(c, g, k) for c, g, k, _ in GOOD if g == 3]
    _write_lists(raw, train, test)
    return raw


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory) -> Path:
    """An uninterrupted ingest of `raw` into 3 shards: what every recovered run must equal."""
    out = tmp_path_factory.mktemp("clean") / "tiny"
    run_ingest(raw, out, num_shards=3)
    return out


@pytest.fixture
def shards(clean, tmp_path) -> Path:
    """A copy of the clean shard folder, for a test to damage."""
    return Path(shutil.copytree(clean, tmp_path / "shards" / "tiny"))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_equals_clean(out: Path, clean: Path) -> None:
    """Byte for byte, but for ingest.json's record of how this run went."""
    ours, theirs = snapshot(out), snapshot(clean)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if name == "ingest.json":
            assert _without_run_record(ours[name]) == _without_run_record(theirs[name])
        else:
            assert ours[name] == theirs[name], name


def _without_run_record(ingest_json: bytes) -> dict:
    run_record = ("seconds", "shards_written", "shards_kept")
    return {k: v for k, v in json.loads(ingest_json).items() if k not in run_record}


def lists_of(raw: Path) -> Path:
    return raw / "ucfTrainTestlist"


def copy_raw(raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "raw"))


# 1. Duplicated classes in classInd.txt


@pytest.mark.parametrize(
    "class_index, line, message",
    [
        (["1 Walk", "2 HandstandPushups", "3 Walk"], 3, "class 'Walk' is named twice (also on"),
        (["1 Walk", "2 HandstandPushups", "3 walk"], 3, "line 1 as 'Walk'; class names are match"),
        (["1 HandstandPushups", "1 Walk", "2 Jump"], 2, "class number 1 is given twice (also on"),
    ],
)
def test_a_class_given_twice_stops_ingest_at_its_class_index_line(
    raw, tmp_path, class_index, line, message
):
    raw = copy_raw(raw, tmp_path)
    (lists_of(raw) / "classInd.txt").write_text("\r\n".join(class_index) + "\r\n")
    out = tmp_path / "shards" / "tiny"

    with pytest.raises(DataError) as err:
        run_ingest(raw, out)

    assert one_line(err).startswith(f"{lists_of(raw) / 'classInd.txt'}:{line}: ")
    assert message in str(err.value)
    assert not out.parent.exists()  # checked before anything was written


# 2. A failed ingest leaves the earlier complete output, or nothing


def _typo(raw: Path) -> Path:
    return raw.parent / "raww"


def _no_video_on_disk(raw: Path) -> Path:
    shutil.rmtree(raw / "videos")
    (raw / "videos").mkdir()
    return raw


def _a_list_that_does_not_parse(raw: Path) -> Path:
    (lists_of(raw) / "classInd.txt").write_text("1 Walk\n2\n")
    return raw


@pytest.mark.parametrize(
    "damage, message",
    [
        (_typo, "raww: raw dataset folder not found"),
        (_no_video_on_disk, "no video to ingest: no listed video is on disk (e.g. videos/"),
        (_a_list_that_does_not_parse, "classInd.txt:2: expected '<number> <ClassName>'"),
    ],
)
@pytest.mark.parametrize("earlier_output", [True, False])
def test_a_failed_ingest_leaves_the_earlier_output_or_nothing(
    raw, clean, tmp_path, damage, message, earlier_output
):
    out = tmp_path / "shards" / "tiny"
    if earlier_output:
        shutil.copytree(clean, out)
    before = sorted(p.name for p in out.parent.glob("*")) if earlier_output else None

    with pytest.raises(DataError) as err:
        run_ingest(damage(copy_raw(raw, tmp_path)), out, num_shards=3)

    assert message in one_line(err)
    if earlier_output:
        assert_equals_clean(out, clean)  # untouched, manifest included
        assert sorted(p.name for p in out.parent.glob("*")) == before
    else:
        assert not out.parent.exists()  # no empty folder for `snakemake -n` to take as done


# 3. Resume survives Snakemake deleting the unfinished output


def test_a_killed_ingest_resumes_after_snakemake_deletes_its_output(
    raw, clean, tmp_path, monkeypatch
):
    out = tmp_path / "shards" / "tiny"
    written = []
    write_shard = ingest_module._write_shard

    def write_then_maybe_die(plan, *args, **kwargs):
        write_shard(plan, *args, **kwargs)
        written.append(plan.index)
        if len(written) == 1:
            raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(ingest_module, "_write_shard", write_then_maybe_die)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(raw, out, num_shards=3)
    shutil.rmtree(out, ignore_errors=True)  # what Snakemake does to an unfinished job's output
    finished = partial_folder(out) / "shard-00000.h5"
    mtime = finished.stat().st_mtime_ns

    summary = run_ingest(raw, out, num_shards=3)

    assert written == [0, 1, 2]  # shard 0 was not encoded again
    assert (summary["shards_kept"], summary["shards_written"]) == (1, 2)
    assert (out / "shard-00000.h5").stat().st_mtime_ns == mtime
    assert_equals_clean(out, clean)
    assert not partial_folder(out).exists()


# 4. A full disk


def fill_disk_at(monkeypatch, file_prefix: str, after_bytes: int) -> None:
    """Writes of HDF5 files named `file_prefix`* fail with ENOSPC once `after_bytes` are written."""
    written = {}
    write_all = io_module._WriteErrorLatch._write_all

    def full(latch, view):
        name = Path(latch._file.name).name  # the temp name: .<file>.<random>.h5.tmp
        written[name] = written.get(name, 0) + len(view)
        if name.startswith(f".{file_prefix}") and written[name] > after_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_all(latch, view)

    monkeypatch.setattr(io_module._WriteErrorLatch, "_write_all", full)


@pytest.mark.parametrize("earlier_output", [True, False])
def test_a_full_disk_stops_ingest_with_one_line_and_a_rerun_equals_a_clean_run(
    raw, clean, tmp_path, monkeypatch, earlier_output
):
    out = tmp_path / "shards" / "tiny"
    if earlier_output:  # of other params: the disk fills while replacing it
        run_ingest(raw, out, num_shards=3, short_side=24)
        earlier = snapshot(out)
    fill_disk_at(monkeypatch, "shard-00001.h5", after_bytes=20_000)  # part way through shard 1

    with pytest.raises(DataError) as err:
        run_ingest(raw, out, num_shards=3)

    assert one_line(err) == (
        f"{partial_folder(out) / 'shard-00001.h5'}: cannot write it, the disk is full (No space "
        "left on device); free some space and run the stage again"
    )
    if earlier_output:
        assert snapshot(out) == earlier
    else:
        assert not out.exists()
    assert sorted(p.name for p in partial_folder(out).iterdir()) == ["shard-00000.h5"]
    mtime = (partial_folder(out) / "shard-00000.h5").stat().st_mtime_ns
    monkeypatch.undo()  # space was freed

    assert run_ingest(raw, out, num_shards=3)["shards_kept"] == 1
    assert (out / "shard-00000.h5").stat().st_mtime_ns == mtime
    assert_equals_clean(out, clean)


def test_a_full_disk_stops_the_feature_cache_with_one_line(shards, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    expected = build(shards, tmp_path / "expected")
    fill_disk_at(monkeypatch, "feat-00001.h5", after_bytes=1_000)

    with pytest.raises(DataError) as err:
        build(shards, cache)

    assert one_line(err).startswith(f"{partial_folder(cache) / 'feat-00001.h5'}: cannot write ")
    assert "the disk is full" in str(err.value)
    assert not cache.exists()
    assert sorted(p.name for p in partial_folder(cache).iterdir()) == ["feat-00000.h5"]
    monkeypatch.undo()

    summary = build(shards, cache)
    assert summary["build"]["shards_kept"] == 1
    assert summary["key"] == expected["key"]
    for name in ("feat-00000.h5", "feat-00001.h5", "feat-00002.h5"):
        assert (cache / name).read_bytes() == (tmp_path / "expected" / name).read_bytes()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_any_atomic_output_names_itself_when_the_disk_is_full(tmp_path, code):
    with pytest.raises(DataError) as err, atomic_path(tmp_path / "table.csv") as tmp:
        tmp.write_text("half")
        raise OSError(code, os.strerror(code))
    assert one_line(err).startswith(f"{tmp_path / 'table.csv'}: cannot write it, the disk is full")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="Permission"), atomic_path(tmp_path / "x.json"):
        raise PermissionError(errno.EACCES, "Permission denied")  # other errors are not "full"
    write_json_atomic(tmp_path / "x.json", {"fine": True})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# 5. Corrupt chunks


def corrupt_chunk(path: Path, dataset: str, row: int) -> None:
    """Flip bytes in the middle of the stored chunk that holds `row`, as a bad sector would."""
    with h5py.File(path, "r") as file:
        data = file[dataset]
        first = row - row % data.chunks[0]
        info = data.id.get_chunk_info_by_coord((first, *[0] * (data.ndim - 1)))
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        damaged = bytes(b ^ 0xFF for b in raw.read(16))
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(damaged)


def test_a_corrupt_frame_chunk_is_caught_by_the_reader_inspect_and_the_cache(shards, tmp_path):
    manifest = pd.read_parquet(shards / "manifest.parquet")
    video = manifest.iloc[1]
    shard = shards / f"shard-{video['shard']:05d}.h5"
    corrupt_chunk(shard, "frames", int(video["offset"]) + 3)
    store = ShardStore(shards)

    with pytest.raises(DataError) as err:
        store.read_clip(1, np.arange(8))

    assert one_line(err).startswith(f"{shard}: frames 0-7 of {video['path']} (manifest row 1)")
    assert "corrupt" in str(err.value) and "run the ingest stage again" in str(err.value)
    # Every other frame still reads, of this video and of the others in its shard.
    assert store.read_clip(1, np.arange(3)).shape == (3, 32, 42, 3)
    store.read_clip(1, np.arange(4, video["num_frames"]))
    for row in np.flatnonzero(manifest["shard"] == video["shard"]):
        if row != 1:
            store.read_clip(int(row), np.arange(int(manifest["num_frames"].iloc[row])))
    text = " ".join(describe(shards).split())  # unwrapped
    assert (
        f"PROBLEM {shard.name} has 1 corrupt frames (checksum mismatch): {video['path']} frames 3;"
        " rerun ingest"
    ) in text
    with pytest.raises(DataError) as err:
        build(shards, tmp_path / "cache")
    assert one_line(err).startswith(f"{shard}: frames ")
    assert not (tmp_path / "cache").exists()


def test_a_corrupt_jpeg_frame_fails_its_crc32_in_the_reader_inspect_and_the_cache(raw, tmp_path):
    # HDF5 keeps variable-length JPEG files in its global heap, which no filter checksums.
    shards = tmp_path / "shards" / "tiny"
    run_ingest(raw, shards, num_shards=3, codec="jpeg")
    video = pd.read_parquet(shards / "manifest.parquet").iloc[1]
    assert video["offset"] == 0  # written first: the first copy of frames the videos share
    shard = shards / f"shard-{video['shard']:05d}.h5"
    with h5py.File(shard, "r") as file:
        payload = file["frames"][2].tobytes()
    data = bytearray(shard.read_bytes())
    middle = data.index(payload) + len(payload) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    shard.write_bytes(data)

    with pytest.raises(DataError) as err:
        ShardStore(shards).read_clip(1, np.arange(4))
    assert one_line(err).startswith(f"{shard}: frames 0-3 of {video['path']} (manifest row 1)")
    assert "fail their CRC-32" in str(err.value)
    assert ShardStore(shards).read_clip(1, np.arange(3, 6)).shape == (3, 32, 42, 3)
    text = " ".join(describe(shards).split())
    problem = f"{shard.name} has 1 corrupt frames (checksum mismatch): {video['path']} frames 2;"
    assert problem in text
    with pytest.raises(DataError, match=f"^{shard}: frames .* fail their CRC-32"):
        build(shards, tmp_path / "cache")


def test_a_corrupt_feature_chunk_is_caught_by_the_reader_and_inspect(shards, tmp_path):
    cache = tmp_path / "cache"
    build(shards, cache)
    manifest = pd.read_parquet(shards / "manifest.parquet")
    video = manifest.iloc[2]
    feat = cache / f"feat-{video['shard']:05d}.h5"
    corrupt_chunk(feat, "embedding", int(video["offset"]))
    features = FeatureCache(cache, shards)

    with pytest.raises(DataError) as err:
        features.read(2, [0, 5])

    assert one_line(err).startswith(f"{feat}: the outputs of frames 0-5 of manifest row 2 are")
    assert "rebuild it with the features stage" in str(err.value)
    assert "PROBLEM" in describe(cache) and f"{feat.name} embedding has" in describe(cache)


def test_an_edited_cache_json_is_refused_naming_it(shards, tmp_path):
    cache = tmp_path / "cache"
    build(shards, cache)
    summary = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({**summary, "feature_dim": 65}))

    with pytest.raises(DataError) as err:
        FeatureCache(cache, shards)

    assert one_line(err).startswith(f"{cache / 'cache.json'}: feature_dim 65, num_parts 0")
    assert "but feat-00000.h5 holds {'embedding': (" in str(err.value)


def test_inspect_verifies_clean_shards_and_caches_without_problems(shards, tmp_path):
    build(shards, tmp_path / "cache")
    assert "PROBLEM" not in describe(shards)
    assert "PROBLEM" not in describe(tmp_path / "cache")


# 6. One line, not a traceback


def test_list_files_that_are_not_utf8_or_cannot_be_read(raw, tmp_path, monkeypatch):
    raw = copy_raw(raw, tmp_path)
    trainlist = lists_of(raw) / "trainlist01.txt"
    trainlist.write_bytes(
        trainlist.read_bytes() + "Walk/v_Caf\xe9_g01_c01.mp4 2\r\n".encode("latin-1")
    )
    with pytest.raises(DataError) as err:
        read_ucf101(raw)
    assert one_line(err).startswith(f"{trainlist}:5: not UTF-8 text (byte 0xe9)")

    class_index = lists_of(raw) / "classInd.txt"
    read_bytes = Path.read_bytes

    def denied(path: Path) -> bytes:  # chmod 000 stops no one when tests run as root
        if path == class_index:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError) as err:
        read_ucf101(raw)
    assert one_line(err) == f"{class_index}: cannot read it (Permission denied)"


def test_consumers_of_a_folder_without_manifest_say_run_ingest(shards, tmp_path):
    build(shards, tmp_path / "cache")
    (shards / "manifest.parquet").unlink()
    expected = f"no manifest.parquet in {shards}: run the ingest stage"
    for open_it in (lambda: ShardStore(shards), lambda: FeatureCache(tmp_path / "cache", shards)):
        with pytest.raises(DataError) as err:
            open_it()
        assert one_line(err) == expected


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: m.write_bytes(b"not parquet at all"), "manifest.parquet: unreadable ("),
        (
            lambda m: pd.read_parquet(m).drop(columns=["offset", "fps"]).to_parquet(m),
            "manifest.parquet: no column fps, offset; run the ingest stage again",
        ),
    ],
)
def test_a_bad_manifest_names_itself(shards, damage, message):
    damage(shards / "manifest.parquet")
    with pytest.raises(DataError) as err:
        ShardStore(shards)
    assert message in one_line(err)
    assert str(err.value).startswith(str(shards))


def test_a_corrupt_hdf5_file_is_named(shards, tmp_path):
    cache = tmp_path / "cache"
    build(shards, cache)
    (cache / "feat-00002.h5").write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        FeatureCache(cache, shards)
    assert one_line(err).startswith(f"{cache / 'feat-00002.h5'}: cannot open (")

    (shards / "shard-00001.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError) as err:
        ShardStore(shards).read_clip(1, [0])
    assert one_line(err).startswith(f"{shards / 'shard-00001.h5'}: cannot open shard")
    with pytest.raises(DataError) as err:
        FeatureCache(cache, shards)
    assert one_line(err).startswith(f"{shards / 'shard-00001.h5'}: cannot read its key")
    assert "PROBLEM shard-00001.h5 unreadable (" in " ".join(describe(shards).split())


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "cache.json: unreadable (Expecting property name"),
        (
            '{"key": "k"}',
            "cache.json: no checkpoint_sha256, feature_dim, num_parts, parts_size, sh",
        ),
        ('["a list"]', "cache.json: not a JSON object; rebuild it with the features stage"),
    ],
)
def test_a_bad_cache_json_names_itself(shards, tmp_path, text, message):
    cache = tmp_path / "cache"
    build(shards, cache)
    (cache / "cache.json").write_text(text)
    with pytest.raises(DataError) as err:
        FeatureCache(cache, shards)
    assert message in one_line(err)
    assert "cache.json" in str(err.value) and str(err.value).startswith(str(cache))
    summary = build(shards, cache)  # the stage rebuilds the summary, not the feat files
    assert summary["build"]["shards_kept"] == 3


# 7. Workers, params types, unreadable folders

WORKERS_SCRIPT = """
import time
from pipeline.data import ingest

def slow(path, **params):
    time.sleep(120)

ingest.decode_video = slow
print("decoding", flush=True)
list(ingest._decode_in_order(["a", "b", "c", "d"], {}, 2))
"""


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="workers die with the parent on Linux only")
def test_decoder_workers_die_with_a_killed_ingest():
    parent = subprocess.Popen(
        [sys.executable, "-c", WORKERS_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    workers = []
    try:
        assert parent.stdout.readline().strip() == "decoding"
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:  # the pool's two decoders
            workers = [pid for pid in _children(parent.pid) if _alive(pid)]
            time.sleep(0.05)
        assert len(workers) >= 2, workers
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers))
    finally:
        parent.kill()
        for pid in filter(_alive, workers):  # only if the test failed
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "section, key, value, problem",
    [
        ("ingest", "num_shards", "4", "Input should be a valid integer"),
        ("ingest", "strict", "yes", "Input should be a valid boolean"),
        ("ingest", "strict", 1, "Input should be a valid boolean"),
        ("ingest", "percents", [1, "5"], "Input should be a valid integer"),
        ("train", "epochs", 30.0, "Input should be a valid integer"),
        ("train", "device", 0, "Input should be 'auto', 'cpu' or 'cuda'"),
    ],
)
def test_params_are_strict_about_types(project_params, section, key, value, problem):
    project_params[section][key] = value
    with pytest.raises(ConfigError) as err:
        validate_params(project_params)
    assert one_line(err).startswith(f"params: {section}.{key}")
    assert problem in str(err.value)


def test_float_params_still_take_ints(project_params):
    project_params["train"]["lr"] = 1
    assert validate_params(project_params).train.lr == 1.0


def test_an_unreadable_class_folder_is_reported_unreadable_not_missing(raw, monkeypatch):
    walk_folder = raw / "videos" / "Walk"
    scandir = os.scandir

    def denied(path="."):  # chmod 000 stops no one when tests run as root
        if Path(path) == walk_folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    videos, rejections = read_ucf101(raw)

    assert set(videos["label_name"]) == {"HandstandPushups"}
    reasons = {r.path: r.reason for r in rejections}
    assert len(reasons) == 3
    for path in (f"videos/{_listed_name('Walk', g, 1)}" for g in (1, 2, 3)):
        assert reasons[path] == "unreadable: cannot list folder videos/Walk (Permission denied)"
