"""LeRobot datasets in and out: a LeRobot folder (layout v3.0 or v2.1) becomes a robomimic-layout HDF5 file,
and an HDF5 file becomes a LeRobot v3.0 folder. Written with pyarrow and PyAV; the `lerobot` package, which
needs another Python and torch, is not used.

Default names (docs/LEROBOT.md has the whole table): `action` <-> `actions`, `next.reward` <-> `rewards`,
`next.done` <-> `dones`, `sim_state` <-> `states`, `observation.images.X` and `observation.X` <-> `obs/X`,
`next.observation.*` <-> `next_obs/*`. An episode's task string (that of its first frame) is the demo's
`instruction`. Values are copied as they are: nothing is rescaled, flipped or sign-changed.

Videos are decoded with PyAV, each frame matched to its row by timestamp (within LeRobot's own tolerance),
so a dropped or shifted frame is an error rather than a silent off-by-one. Input folders and files are only
read; outputs are written under a temporary name beside their final one and renamed at the end, so a
failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lcbc.data.dataset import resize_images
from lcbc.data.hdf5 import DemoWriter, demo_instruction, open_demo_file, validate
from lcbc.errors import UserError

READ_VERSIONS = ("v2.1", "v3.0")
WRITE_VERSION = "v3.0"
TIMESTAMP_TOLERANCE_S = 1e-4  # LeRobot's default: a frame further than this from a row's time is another frame
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
NAMES = {"action": "actions", "next.reward": "rewards", "next.done": "dones", "sim_state": "states"}
PREFIXES = (("next.observation.images.", "next_obs/"), ("next.observation.", "next_obs/"),
            ("observation.images.", "obs/"), ("observation.", "obs/"))
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
CHUNKS_SIZE, DATA_FILE_MB, VIDEO_FILE_MB = 1000, 100, 200  # LeRobot's defaults: files per chunk, sizes of a file
VIDEO_OPTIONS = {"g": "2", "crf": "30"}  # LeRobot's defaults: a key frame every 2 frames keeps seeking cheap
CAMERA_DTYPES = ("video", "image")


@dataclass
class Conversion:
    """What a conversion did, for the command's summary."""
    episodes: int = 0
    frames: int = 0
    names: dict[str, str] = field(default_factory=dict)  # source key -> destination key
    left_out: list[str] = field(default_factory=list)  # source keys with no default place and no --rename
    seconds: float = 0.0


# ---- names --------------------------------------------------------------------------------------------------

def hdf5_key(feature: str) -> str | None:
    """Where a LeRobot feature goes in a demo by default; None for one with no default place."""
    if feature in NAMES:
        return NAMES[feature]
    for prefix, group in PREFIXES:
        if feature.startswith(prefix):
            return group + feature[len(prefix):]
    return None


def feature_name(key: str, is_camera: bool) -> str:
    """The LeRobot feature a demo's array becomes by default (the inverse of `hdf5_key`)."""
    for feature, name in NAMES.items():
        if name == key:
            return feature
    group, _, name = key.partition("/")
    return {"obs": "observation.", "next_obs": "next.observation."}[group] + ("images." if is_camera else "") + name


def _choose(available: list[str], default: Callable[[str], str | None], keys: list[str] | None,
            rename: dict[str, str], where: str) -> tuple[dict[str, str], list[str]]:
    """Source key -> destination key for the chosen `keys` (default: all with a default place or a rename),
    and the keys left out."""
    for key in [*(keys or []), *rename]:
        if key not in available:
            raise UserError(f"{where}: no {key!r} to choose or rename (has {', '.join(available)})")
    chosen = keys if keys is not None else [key for key in available if key in rename or default(key)]
    names = {key: rename.get(key) or default(key) for key in chosen}
    for key, name in names.items():
        if name is None:
            raise UserError(f"{where}: {key!r} has no default place; name one with --rename {key}=NAME")
    taken = set()
    for key, name in names.items():
        if name in taken:
            raise UserError(f"{where}: two keys go to {name!r}; rename one with --rename {key}=NAME")
        taken.add(name)
    return names, [key for key in available if key not in names]


# ---- small readers that fail with one line -------------------------------------------------------------------

def _read_parquet(folder: Path, relative: str, columns: list[str] | None = None) -> pa.Table:
    path = folder / relative
    if not path.is_file():
        raise UserError(f"{folder}: {relative}: no such file")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{folder}: {relative}: unreadable parquet file ({error})") from None


def _read_jsonl(folder: Path, relative: str, fields: tuple[str, ...]) -> list[dict]:
    path = folder / relative
    if not path.is_file():
        raise UserError(f"{folder}: {relative}: no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{folder}: {relative}: line {number} is not JSON") from None
        missing = [name for name in fields if not isinstance(row, dict) or name not in row]
        if missing:
            raise UserError(f"{folder}: {relative}: line {number} has no {missing[0]!r}")
        rows.append(row)
    return rows


def read_info(folder: Path) -> dict:
    """meta/info.json, checked for what the reader relies on."""
    path = folder / "meta" / "info.json"
    if not path.is_file():
        raise UserError(f"{folder}: no meta/info.json (neither a LeRobot dataset folder nor an HDF5 file)")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{folder}: meta/info.json: not readable JSON ({error})") from None
    if not isinstance(info, dict):
        raise UserError(f"{folder}: meta/info.json: expected a JSON object")
    version = info.get("codebase_version")
    if version not in READ_VERSIONS:
        raise UserError(f"{folder}: meta/info.json: codebase_version {version!r} is not one lcbc reads "
                        f"({', '.join(READ_VERSIONS)})")
    for name in ("fps", "features", "data_path"):
        if name not in info:
            raise UserError(f"{folder}: meta/info.json: no {name!r}")
    for name, feature in info["features"].items():
        if not isinstance(feature, dict) or "dtype" not in feature or "shape" not in feature:
            raise UserError(f"{folder}: meta/info.json: feature {name!r} has no dtype and shape")
    if any(f["dtype"] == "video" for f in info["features"].values()) and not info.get("video_path"):
        raise UserError(f"{folder}: meta/info.json: video features but no 'video_path'")
    return info


# ---- LeRobot folder -> HDF5 ----------------------------------------------------------------------------------

@dataclass
class _Episode:
    index: int
    length: int
    data_file: str  # relative to the folder
    videos: dict[str, tuple[str, float]]  # video feature -> (mp4 relative to the folder, time of its first frame)


def _tasks(folder: Path, version: str) -> dict[int, str]:
    if version == "v2.1":
        return {int(row["task_index"]): row["task"]
                for row in _read_jsonl(folder, "meta/tasks.jsonl", ("task_index", "task"))}
    table = _read_parquet(folder, "meta/tasks.parquet")
    texts = [name for name in table.column_names if name != "task_index"]  # pandas keeps the task as its index
    if "task_index" not in table.column_names or len(texts) != 1:
        raise UserError(f"{folder}: meta/tasks.parquet: expected a task_index column and a task column, "
                        f"found {table.column_names}")
    return dict(zip(table["task_index"].to_pylist(), table[texts[0]].to_pylist()))


def _episodes(folder: Path, info: dict) -> list[_Episode]:
    """Where each episode's rows and video frames are, from meta/episodes.jsonl (v2.1: one file per episode)
    or meta/episodes/*/*.parquet (v3.0: many episodes per file, located by index and time)."""
    video_keys = [name for name, feature in info["features"].items() if feature["dtype"] == "video"]
    episodes = []
    try:
        if info["codebase_version"] == "v2.1":
            chunks_size = int(info.get("chunks_size", CHUNKS_SIZE))
            for row in _read_jsonl(folder, "meta/episodes.jsonl", ("episode_index", "length")):
                names = {"episode_index": int(row["episode_index"]),
                         "episode_chunk": int(row["episode_index"]) // chunks_size}
                episodes.append(_Episode(names["episode_index"], int(row["length"]), info["data_path"].format(**names),
                                         {key: (info["video_path"].format(video_key=key, **names), 0.0)
                                          for key in video_keys}))
            return sorted(episodes, key=lambda episode: episode.index)
        files = sorted(path.relative_to(folder) for path in (folder / "meta" / "episodes").glob("chunk-*/*.parquet"))
        if not files:
            raise UserError(f"{folder}: no meta/episodes/chunk-*/*.parquet")
        for relative in files:
            columns = [name for name in pq.read_schema(folder / relative).names if not name.startswith("stats/")]
            for row in _read_parquet(folder, str(relative), columns).to_pylist():
                data_file = info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                     file_index=row["data/file_index"])
                videos = {key: (info["video_path"].format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                                          file_index=row[f"videos/{key}/file_index"]),
                                float(row[f"videos/{key}/from_timestamp"])) for key in video_keys}
                episodes.append(_Episode(int(row["episode_index"]), int(row["length"]), data_file, videos))
    except KeyError as error:
        raise UserError(f"{folder}: meta/episodes: no {error.args[0]!r} (for the data and video file paths)") \
            from None
    return sorted(episodes, key=lambda episode: episode.index)


class _DataFiles:
    """The data parquet files, one held at a time: a v3.0 file holds many episodes one after another."""

    def __init__(self, folder: Path, features: dict):
        self.folder, self.features = folder, features
        self.path = None

    def rows(self, episode: _Episode) -> pa.Table:
        if episode.data_file != self.path:
            self.table = _read_parquet(self.folder, episode.data_file)
            missing = [name for name, feature in self.features.items()
                       if feature["dtype"] != "video" and name not in self.table.column_names]
            if missing:
                raise UserError(f"{self.folder}: {episode.data_file}: feature {missing[0]!r} of meta/info.json "
                                f"is not a column (columns: {', '.join(self.table.column_names)})")
            self.episode_index = self.table["episode_index"].to_numpy()
            self.frame_index = self.table["frame_index"].to_numpy()
            self.path = episode.data_file
        rows = np.flatnonzero(self.episode_index == episode.index)
        if len(rows) != episode.length:
            raise UserError(f"{self.folder}: {episode.data_file}: episode {episode.index} has {len(rows)} rows, "
                            f"meta says {episode.length}")
        return self.table.take(rows[np.argsort(self.frame_index[rows], kind="stable")])


def _column(table: pa.Table, name: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A numeric column (scalars, or lists of any nesting) as a (T, *shape) array."""
    column = table[name].combine_chunks()
    if column.null_count:
        raise UserError(f"{where}: {name} has empty values")
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or \
            pa.types.is_fixed_size_list(column.type):
        column = column.flatten()
    values = column.to_numpy(zero_copy_only=False)
    if values.size != len(table) * math.prod(shape):
        raise UserError(f"{where}: {name} holds {values.size / max(len(table), 1):g} values a frame, "
                        f"meta/info.json says shape {list(shape)}")
    return values.reshape(len(table), *shape)


def _decode_images(table: pa.Table, name: str, where: str) -> np.ndarray:
    """An image feature stored in the parquet file: PNG or JPEG bytes in a {bytes, path} struct per row."""
    images = []
    for frame, data in enumerate(table[name].combine_chunks().field("bytes").to_pylist()):
        if data is None:
            raise UserError(f"{where}: {name}: frame {frame} holds no image bytes")
        with Image.open(io.BytesIO(data)) as image:
            images.append(np.asarray(image.convert("RGB")))
    return np.stack(images)


class _VideoFrames:
    """One mp4 file decoded forward, once: each asked-for time gets the frame shown at exactly that time."""

    def __init__(self, folder: Path, relative: str, feature: str):
        self.path, self.where, self.feature = folder / relative, f"{folder}: {relative}", feature
        if not self.path.is_file():
            raise UserError(f"{self.where}: no such file (the video of {feature})")
        self._open()

    def _open(self) -> None:
        try:
            self.container = av.open(str(self.path))
            stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError) as error:
            raise UserError(f"{self.where}: unreadable video ({error})") from None
        stream.thread_type = "AUTO"
        self.decoded = self.container.decode(stream)
        self.frame, self.end = None, 0.0

    def at(self, times: np.ndarray, episode: int) -> np.ndarray:
        if self.frame is not None and times[0] < self.frame.time - TIMESTAMP_TOLERANCE_S:  # asked to go back
            self.close()
            self._open()
        frames = []
        for time_s in times:
            while self.frame is None or self.frame.time < time_s - TIMESTAMP_TOLERANCE_S:
                try:
                    self.frame = next(self.decoded, None)
                except av.FFmpegError as error:
                    raise UserError(f"{self.where}: undecodable video ({error})") from None
                if self.frame is None:
                    raise UserError(f"{self.where}: {self.feature}: episode {episode} needs a frame at {time_s:.3f} s "
                                    f"but the video ends at {self.end:.3f} s (shorter than its timestamps)")
                self.end = self.frame.time
            if abs(self.frame.time - time_s) > TIMESTAMP_TOLERANCE_S:
                raise UserError(f"{self.where}: {self.feature}: episode {episode} has no frame at {time_s:.4f} s "
                                f"(the nearest is at {self.frame.time:.4f} s)")
            frames.append(self.frame.to_ndarray(format="rgb24"))
        return np.stack(frames)

    def close(self) -> None:
        self.container.close()


def _progress(label: str) -> Progress:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), transient=True)  # stdout stays clean for --json


def _beside(destination: Path) -> Path:
    """A temporary name in the destination's folder, so the final rename stays on one file system."""
    return destination.with_name(f".{destination.name}.{os.getpid()}.partial")


def _check_destination(source: Path, destination: Path, overwrite: bool) -> None:
    if destination.exists() and not overwrite:
        raise UserError(f"{destination}: exists; pass --overwrite to replace it")
    if destination.resolve().is_relative_to(source.resolve()):
        raise UserError(f"{destination}: lies inside {source}; the input is never modified")


def _replace(temporary: Path, destination: Path) -> None:
    """Move a finished output into place (replacing an old one only --overwrite lets through)."""
    if destination.is_dir():
        shutil.rmtree(destination)
    elif temporary.is_dir():
        destination.unlink(missing_ok=True)
    os.replace(temporary, destination)


def lerobot_to_hdf5(folder: str | os.PathLike, destination: str | os.PathLike, keys: list[str] | None = None,
                    rename: dict[str, str] | None = None, image_size: int | None = None,
                    overwrite: bool = False) -> Conversion:
    """Convert a LeRobot dataset folder into one HDF5 demonstration file (one demo per episode)."""
    start = time.perf_counter()
    folder, destination = Path(folder), Path(destination)
    info = read_info(folder)
    _check_destination(folder, destination, overwrite)
    features = {name: feature for name, feature in info["features"].items() if name not in BOOKKEEPING}
    usable = [name for name, feature in features.items() if feature["dtype"] != "string"]
    names, left_out = _choose(usable, hdf5_key, keys, rename or {}, str(folder))
    for name in names.values():
        group, _, key = name.partition("/")
        if name not in NAMES.values() and not (group in ("obs", "next_obs") and key and "/" not in key):
            raise UserError(f"--rename: {name!r} is no place in a demo (actions, rewards, dones, states, obs/NAME, "
                            "next_obs/NAME)")
    if "actions" not in names.values() or not any(name.startswith("obs/") for name in names.values()):
        raise UserError(f"{folder}: no feature goes to 'actions' and at least one 'obs/NAME' (features: "
                        f"{', '.join(usable)}); name them with --rename FEATURE=actions FEATURE=obs/NAME")
    tasks = _tasks(folder, info["codebase_version"])
    episodes = _episodes(folder, info)
    data = _DataFiles(folder, info["features"])
    videos: dict[str, _VideoFrames] = {}
    env_args = {"env_name": folder.name, "env_type": "lerobot",
                "env_kwargs": {"fps": info["fps"], "robot_type": info.get("robot_type")}}
    temporary = _beside(destination)
    report = Conversion(names=names, left_out=left_out)
    try:
        with DemoWriter(temporary, env_args) as writer, _progress(f"convert {folder.name}") as progress:
            for episode in progress.track(episodes):
                rows = data.rows(episode)
                where = f"{folder}: {episode.data_file}: episode {episode.index}"
                arrays = {}
                for feature, name in names.items():
                    dtype = features[feature]["dtype"]
                    if dtype == "video":
                        relative, offset = episode.videos[feature]
                        if feature not in videos or videos[feature].path != folder / relative:
                            if feature in videos:
                                videos[feature].close()
                            videos[feature] = _VideoFrames(folder, relative, feature)
                        times = offset + rows["timestamp"].to_numpy().astype(np.float64)
                        arrays[name] = resize_images(videos[feature].at(times, episode.index), image_size)
                    elif dtype == "image":
                        arrays[name] = resize_images(_decode_images(rows, feature, where), image_size)
                    else:
                        values = _column(rows, feature, tuple(features[feature]["shape"]), where)
                        arrays[name] = values.reshape(len(rows)) if name in ("rewards", "dones") else values
                task_index = rows["task_index"][0].as_py()
                if task_index not in tasks:
                    raise UserError(f"{where}: task_index {task_index} is not in meta/tasks")
                length = len(rows)
                writer.add_demo(arrays["actions"], _group(arrays, "obs"),
                                arrays.get("rewards", np.zeros(length, np.float32)),
                                arrays.get("dones", (np.arange(length) == length - 1).astype(np.int64)),
                                states=arrays.get("states"), next_obs=_group(arrays, "next_obs"),
                                instruction=tasks[task_index], lerobot_episode=episode.index)
                report.episodes, report.frames = report.episodes + 1, report.frames + length
        if not report.episodes:
            raise UserError(f"{folder}: no episodes")
        _replace(temporary, destination)
    finally:
        for video in videos.values():
            video.close()
        temporary.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


def _group(arrays: dict[str, np.ndarray], group: str) -> dict[str, np.ndarray]:
    return {name.partition("/")[2]: values for name, values in arrays.items() if name.startswith(group + "/")}


# ---- HDF5 -> LeRobot v3.0 folder -----------------------------------------------------------------------------

def _stats(values: np.ndarray, is_camera: bool) -> dict[str, np.ndarray]:
    """LeRobot's per-feature statistics: per dimension, or per channel in [0, 1] for cameras."""
    if is_camera:
        values = values.reshape(-1, values.shape[-1]).astype(np.float64) / 255
        reshape = (-1, 1, 1)  # LeRobot keeps camera statistics as (C, 1, 1)
    else:
        values = values.reshape(len(values), -1).astype(np.float64)
        reshape = (-1,)
    return {"min": values.min(0).reshape(reshape), "max": values.max(0).reshape(reshape),
            "mean": values.mean(0).reshape(reshape), "std": values.std(0).reshape(reshape),
            "count": np.array([len(values)])}


def _combined_stats(parts: list[dict[str, np.ndarray]]) -> dict[str, list]:
    """Statistics of all episodes together from each episode's (counts weight the means and variances)."""
    counts = np.array([part["count"][0] for part in parts], dtype=np.float64)
    weights = counts.reshape(-1, *[1] * parts[0]["mean"].ndim) / counts.sum()
    means = np.stack([part["mean"] for part in parts])
    mean = (weights * means).sum(0)
    variance = (weights * (np.stack([part["std"] for part in parts]) ** 2 + (means - mean) ** 2)).sum(0)
    return {"min": np.min([part["min"] for part in parts], 0).tolist(),
            "max": np.max([part["max"] for part in parts], 0).tolist(),
            "mean": mean.tolist(), "std": np.sqrt(variance).tolist(), "count": [int(counts.sum())]}


def _arrow(values: np.ndarray) -> pa.Array:
    """One value a row for shape (1,) (as LeRobot stores it), else a fixed-size list a row."""
    flat = values.reshape(len(values), -1)
    if flat.shape[1] == 1:
        return pa.array(flat[:, 0])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def _png_column(images: np.ndarray) -> pa.Array:
    """Images stored as images: lossless PNG bytes in the {bytes, path} struct LeRobot's image feature reads."""
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        encoded.append(buffer.getvalue())
    return pa.StructArray.from_arrays([pa.array(encoded, pa.binary()), pa.nulls(len(encoded), pa.string())],
                                      names=["bytes", "path"])


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file + 1 == CHUNKS_SIZE else (chunk, file + 1)


class _DataWriter:
    """Episodes' rows into data/chunk-*/file-*.parquet, a new file once one holds DATA_FILE_MB."""

    def __init__(self, folder: Path):
        self.folder, self.chunk, self.file, self.writer, self.size = folder, 0, 0, None, 0

    def add(self, table: pa.Table) -> dict[str, int]:
        if self.writer is None:
            path = self.folder / DATA_PATH.format(chunk_index=self.chunk, file_index=self.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer, self.size = pq.ParquetWriter(path, table.schema, compression="snappy"), 0
        self.writer.write_table(table)  # one row group per episode
        place = {"data/chunk_index": self.chunk, "data/file_index": self.file}
        self.size += table.nbytes
        if self.size >= DATA_FILE_MB * 2**20:
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file)
        return place

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _VideoWriter:
    """One camera's episodes into videos/<feature>/chunk-*/file-*.mp4, one after another; frame i of a file is
    shown at i / fps, so an episode's place is its file and the times of its first and last frames."""

    def __init__(self, folder: Path, feature: str, fps: int, codec: str):
        self.folder, self.feature, self.fps, self.codec = folder, feature, fps, codec
        self.chunk, self.file, self.container = 0, 0, None

    def path(self) -> Path:
        return self.folder / VIDEO_PATH.format(video_key=self.feature, chunk_index=self.chunk, file_index=self.file)

    def add(self, frames: np.ndarray) -> dict[str, float]:
        if self.container is None:
            os.environ.setdefault("SVT_LOG", "1")  # errors only: SVT-AV1 prints a banner for every file otherwise
            self.path().parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path()), "w")
            self.stream = self.container.add_stream(self.codec, rate=self.fps, options=VIDEO_OPTIONS)
            self.stream.height, self.stream.width, self.stream.pix_fmt = *frames.shape[1:3], "yuv420p"
            self.frames = 0
        first = self.frames
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = self.frames, Fraction(1, self.fps)
            self.container.mux(self.stream.encode(frame))
            self.frames += 1
        key = f"videos/{self.feature}/"
        place = {key + "chunk_index": self.chunk, key + "file_index": self.file,
                 key + "from_timestamp": first / self.fps, key + "to_timestamp": self.frames / self.fps}
        if self.path().exists() and self.path().stat().st_size >= VIDEO_FILE_MB * 2**20:  # written as it goes
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file)
        return place

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))
            self.container.close()
            self.container = None

    def info(self) -> dict:
        """The `info` LeRobot keeps with a video feature in meta/info.json."""
        with av.open(str(self.folder / VIDEO_PATH.format(video_key=self.feature, chunk_index=0, file_index=0))) \
                as container:
            stream = container.streams.video[0]
            return {"video.height": stream.height, "video.width": stream.width,
                    "video.codec": stream.codec_context.codec.canonical_name, "video.pix_fmt": stream.pix_fmt,
                    "video.is_depth_map": False, "video.fps": self.fps, "video.channels": 3, "has_audio": False}


def _tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as pandas writes it: LeRobot reads it with pandas, the task string as the index."""
    index = "__index_level_0__"
    pandas = {"index_columns": [index], "column_indexes": [], "creator": {"library": "lcbc"},
              "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                           "numpy_type": "int64", "metadata": None},
                          {"name": None, "field_name": index, "pandas_type": "unicode", "numpy_type": "object",
                           "metadata": None}]}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), index: pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({"pandas": json.dumps(pandas)})


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=4) + "\n")


class _FolderWriter:
    """A LeRobot v3.0 folder written one episode at a time; `finish` writes the metadata."""

    def __init__(self, folder: Path, fps: int, images: str, codec: str):
        self.folder, self.fps, self.images, self.codec = folder, fps, images, codec
        self.data = _DataWriter(folder)
        self.videos: dict[str, _VideoWriter] = {}
        self.features: dict[str, dict] = {}
        self.tasks: list[str] = []
        self.episodes: list[dict] = []
        self.stats: dict[str, list[dict]] = {}
        self.frames = 0

    def add_episode(self, arrays: dict[str, np.ndarray], cameras: set[str], task: str, where: str) -> None:
        """arrays: feature name -> (T, ...) values, camera features (T, H, W, 3) uint8."""
        if task not in self.tasks:
            self.tasks.append(task)
        length = len(next(iter(arrays.values())))
        index = len(self.episodes)
        arrays = {**arrays, "timestamp": (np.arange(length) / self.fps).astype(np.float32),
                  "frame_index": np.arange(length), "episode_index": np.full(length, index),
                  "index": np.arange(self.frames, self.frames + length),
                  "task_index": np.full(length, self.tasks.index(task))}
        row = {"episode_index": index, "tasks": [task], "length": length,
               "dataset_from_index": self.frames, "dataset_to_index": self.frames + length}
        columns = {}
        for name, values in arrays.items():
            self._check_feature(name, values, name in cameras, where)
            if name in cameras and self.images == "video":
                row |= self.videos[name].add(values)
            else:
                columns[name] = _png_column(values) if name in cameras else _arrow(values)
            stats = _stats(values, name in cameras)
            self.stats.setdefault(name, []).append(stats)
            row |= {f"stats/{name}/{stat}": value.tolist() for stat, value in stats.items()}
        row |= self.data.add(pa.table(columns))
        self.episodes.append(row | {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        self.frames += length

    def _check_feature(self, name: str, values: np.ndarray, camera: bool, where: str) -> None:
        """The first episode declares each feature; later ones must match it."""
        shape = list(values.shape[1:]) if camera else [math.prod(values.shape[1:])]
        if name in self.features:
            if shape != self.features[name]["shape"]:
                raise UserError(f"{where}: {name} has shape {shape}, the first demo's {self.features[name]['shape']} "
                                "(a LeRobot feature has one shape; --keys can leave it out)")
            return
        if not camera:
            self.features[name] = {"dtype": str(values.dtype), "shape": shape, "names": None}
            return
        self.features[name] = {"dtype": self.images, "shape": shape, "names": ["height", "width", "channels"]}
        if self.images == "video":
            if shape[0] % 2 or shape[1] % 2:
                raise UserError(f"{where}: {name} is {shape[0]}x{shape[1]}; videos need even sizes (use --images "
                                "image or --image-size)")
            self.videos[name] = _VideoWriter(self.folder, name, self.fps, self.codec)

    def finish(self, robot_type: str | None) -> None:
        self.close()
        for name, writer in self.videos.items():
            self.features[name]["info"] = writer.info()
        pq.write_table(pa.Table.from_pylist(self.episodes), _mkdir(self.folder / EPISODES_PATH))
        pq.write_table(_tasks_table(self.tasks), _mkdir(self.folder / "meta" / "tasks.parquet"))
        _write_json(self.folder / "meta" / "stats.json",
                    {name: _combined_stats(parts) for name, parts in self.stats.items()})
        _write_json(self.folder / "meta" / "info.json", {
            "codebase_version": WRITE_VERSION, "robot_type": robot_type, "total_episodes": len(self.episodes),
            "total_frames": self.frames, "total_tasks": len(self.tasks), "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB, "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.videos else None, "features": self.features})

    def close(self) -> None:
        self.data.close()
        for writer in self.videos.values():
            writer.close()


def _mkdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def hdf5_to_lerobot(path: str | os.PathLike, destination: str | os.PathLike, keys: list[str] | None = None,
                    rename: dict[str, str] | None = None, images: str = "video", image_size: int | None = None,
                    fps: int | None = None, codec: str = "libsvtav1", instruction: str | None = None,
                    overwrite: bool = False) -> Conversion:
    """Convert an HDF5 demonstration file into a LeRobot v3.0 folder (one episode per demo).

    images: 'video' (mp4, lossy, what LeRobot records) or 'image' (PNG in the parquet files, lossless).
    fps: frames per second for timestamps (default: the file's env_args fps, else 30)."""
    start = time.perf_counter()
    path, destination = Path(path), Path(destination)
    if images not in CAMERA_DTYPES:
        raise UserError(f"--images: {images!r} is not one of {', '.join(CAMERA_DTYPES)}")
    if images == "video":
        try:
            av.codec.Codec(codec, "w")
        except av.FFmpegError:
            raise UserError(f"--video-codec: PyAV cannot encode {codec!r}") from None
    _check_destination(path, destination, overwrite)
    temporary = _beside(destination)
    try:
        with open_demo_file(path) as file, _progress(f"convert {path.name}") as progress:
            demos = validate(file, path)
            first = file["data"][demos[0]]
            available = [key for key in ("actions", "rewards", "dones", "states") if key in first] + \
                [f"{group}/{key}" for group in ("obs", "next_obs") if group in first for key in first[group]]
            cameras = {key for key in available if first[key].dtype == np.uint8 and first[key].ndim == 4}
            names, left_out = _choose(available, lambda key: feature_name(key, key in cameras), keys, rename or {},
                                      str(path))
            for name in names.values():
                if "/" in name or name in BOOKKEEPING:
                    raise UserError(f"--rename: {name!r} cannot name a LeRobot feature (no '/'; "
                                    f"{', '.join(BOOKKEEPING)} are taken)")
            env_kwargs = json.loads(file["data"].attrs.get("env_args", "{}")).get("env_kwargs") or {}
            writer = _FolderWriter(temporary, int(fps or env_kwargs.get("fps") or 30), images, codec)
            try:
                for demo in progress.track(demos):
                    group = file["data"][demo]
                    task = demo_instruction(file, demo, path, instruction)
                    if task is None:
                        raise UserError(f"{path}: {demo}: no instruction; pass --instruction TEXT for the whole file")
                    missing = [key for key in names if key not in group]
                    if missing:
                        raise UserError(f"{path}: {demo}: no {missing[0]!r} (the first demo has it)")
                    arrays = {name: resize_images(group[key][()], image_size) if key in cameras else group[key][()]
                              for key, name in names.items()}
                    writer.add_episode(arrays, {names[key] for key in cameras if key in names}, task,
                                       f"{path}: {demo}")
                writer.finish(env_kwargs.get("robot_type"))
            finally:
                writer.close()
        _replace(temporary, destination)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return Conversion(len(demos), writer.frames, names, left_out, time.perf_counter() - start)


# ---- a LeRobot folder wherever an HDF5 file is read ----------------------------------------------------------

def cache_dir() -> Path:
    """Where converted folders are kept: $LCBC_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("LCBC_CACHE_DIR"):
        return Path(os.environ["LCBC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lcbc"


def cached_hdf5(folder: str | os.PathLike) -> Path:
    """The HDF5 conversion of a LeRobot folder, made on first use and kept in `cache_dir()` under a name keyed
    by the folder's path and its files' sizes and modification times (an edited folder converts again)."""
    folder = Path(folder).resolve()
    read_info(folder)  # a folder that is not a LeRobot dataset fails here, with one line
    digest = hashlib.sha256(str(folder).encode())
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    cached = cache_dir() / "lerobot" / f"{folder.name}-{digest.hexdigest()[:16]}.hdf5"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        lerobot_to_hdf5(folder, cached)
    return cached
