"""LeRobot datasets in and out: round trips through lcbc's own v3.0 writer, a v2.1 folder built here by hand,
a v3.0 folder written by LeRobot's own code (tests/data), training on a folder, and malformed folders."""

from __future__ import annotations

import hashlib
import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lcbc.cli import main
from lcbc.data.hdf5 import open_demo_file
from lcbc.data.lerobot import hdf5_to_lerobot, lerobot_to_hdf5
from tests.conftest import write_demo_file

ROOT = Path(__file__).resolve().parents[1]
LEROBOT_MADE = ROOT / "tests" / "data" / "lerobot_v30_tiny"  # made by lerobot 0.4.4: make_lerobot_dataset.py


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LCBC_CACHE_DIR", str(tmp_path / "cache"))


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def flat_frames(lengths, size=16) -> list[np.ndarray]:
    """Each frame one flat colour that names its step and episode, so a decoded frame shows which it is."""
    return [np.stack([np.full((size, size, 3), (12 * t + 20, 60 * d, 200), np.uint8) for t in range(length)])
            for d, length in enumerate(lengths)]


def demo_file_with_cameras(path, lengths=(6, 9, 4)):
    """conftest's synthetic file plus a second camera of flat frames and simulator states."""
    write_demo_file(path, lengths=lengths, image_size=16, instructions=["open the drawer", "close the drawer"])
    with h5py.File(path, "a") as file:
        for d, frames in enumerate(flat_frames(lengths)):
            file[f"data/demo_{d}/obs/wrist_rgb"] = frames
            file[f"data/demo_{d}/states"] = np.random.default_rng(d).normal(size=(len(frames), 5))
    return path


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """An mp4 written with PyAV directly (h264), frame i at i / fps, as LeRobot's recorder lays them out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def assert_same_demos(original: Path, converted: Path, image_error: float = 0.0) -> None:
    with h5py.File(original) as a, h5py.File(converted) as b:
        assert list(a["data"]) == list(b["data"])
        for demo in a["data"]:
            first, second = a["data"][demo], b["data"][demo]
            assert first.attrs["instruction"] == second.attrs["instruction"]
            keys = ["actions", "rewards", "dones", "states"] + [f"obs/{key}" for key in first["obs"]]
            for key in keys:
                x, y = first[key][()], second[key][()]
                assert x.dtype == y.dtype and x.shape == y.shape, key
                if x.dtype == np.uint8:
                    assert np.abs(x.astype(float) - y).mean() <= image_error, (demo, key)
                else:
                    np.testing.assert_array_equal(x, y, err_msg=f"{demo} {key}")


def test_round_trip_with_images_stored_as_images_is_exact(tmp_path):
    original = demo_file_with_cameras(tmp_path / "demos.hdf5")
    main(["convert", str(original), str(tmp_path / "lerobot"), "--images", "image", "--fps", "20"])
    info = json.loads((tmp_path / "lerobot" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20 and info["video_path"] is None
    assert info["features"]["observation.images.wrist_rgb"]["dtype"] == "image"
    main(["convert", str(tmp_path / "lerobot"), str(tmp_path / "back.hdf5")])
    assert_same_demos(original, tmp_path / "back.hdf5")


def test_round_trip_through_video_keeps_arrays_exact_and_every_frame_in_its_place(tmp_path):
    original = demo_file_with_cameras(tmp_path / "demos.hdf5")
    main(["convert", str(original), str(tmp_path / "lerobot")])
    folder = tmp_path / "lerobot"
    assert len(list(folder.glob("videos/observation.images.wrist_rgb/chunk-000/file-*.mp4"))) == 1  # many episodes
    main(["convert", str(folder), str(tmp_path / "back.hdf5")])
    assert_same_demos(original, tmp_path / "back.hdf5", image_error=4.0)
    with h5py.File(tmp_path / "back.hdf5") as file:
        for d, frames in enumerate(flat_frames((6, 9, 4))):
            decoded = file[f"data/demo_{d}/obs/wrist_rgb"][:, 8, 8, 0].astype(int)
            assert np.abs(decoded - frames[:, 8, 8, 0]).max() <= 3  # frames 12 levels apart: none shifted


def test_hand_built_v21_folder_converts(tmp_path):
    """Layout v2.1, made here with pyarrow and PyAV: one parquet and one mp4 per episode, jsonl metadata."""
    folder, fps, lengths = tmp_path / "koch_v21", 15, (6, 4)
    tasks = ["pick the cube", "stack the cubes"]
    features = {"observation.state": {"dtype": "float32", "shape": [2], "names": None},
                "action": {"dtype": "float32", "shape": [2], "names": None},
                "next.reward": {"dtype": "float32", "shape": [1], "names": None},
                "observation.images.top": {"dtype": "video", "shape": [16, 16, 3],
                                           "names": ["height", "width", "channels"]},
                **{name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in
                   (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                    ("index", "int64"), ("task_index", "int64"))}}
    info = {"codebase_version": "v2.1", "robot_type": "koch", "total_episodes": 2, "total_frames": sum(lengths),
            "total_tasks": 2, "total_videos": 2, "total_chunks": 1, "chunks_size": 1000, "fps": fps,
            "splits": {"train": "0:2"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": features}
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "info.json").write_text(json.dumps(info))
    (folder / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": task}) + "\n"
                                                         for i, task in enumerate(tasks)))
    (folder / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [tasks[e]], "length": n}) + "\n" for e, n in enumerate(lengths)))
    (folder / "meta" / "episodes_stats.jsonl").write_text("")  # statistics: not read
    start = 0
    for episode, (length, frames) in enumerate(zip(lengths, flat_frames(lengths))):
        steps = np.arange(length)
        table = pa.table({"observation.state": pa.array([[t, 10.0 * episode] for t in steps], pa.list_(pa.float32())),
                          "action": pa.array([[t / 10, -t / 10] for t in steps], pa.list_(pa.float32())),
                          "next.reward": pa.array(steps == length - 1, pa.bool_()).cast(pa.float32()),
                          "timestamp": pa.array(steps / fps, pa.float32()), "frame_index": steps,
                          "episode_index": np.full(length, episode), "index": start + steps,
                          "task_index": np.full(length, episode)})
        path = folder / f"data/chunk-000/episode_{episode:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        write_video(folder / f"videos/chunk-000/observation.images.top/episode_{episode:06d}.mp4", frames, fps)
        start += length
    before = folder_digest(folder)
    main(["convert", str(folder), str(tmp_path / "koch.hdf5"), "--rename", "observation.images.top=obs/top_rgb"])
    assert folder_digest(folder) == before  # the input is only read
    with h5py.File(tmp_path / "koch.hdf5") as file:
        assert json.loads(file["data"].attrs["env_args"])["env_kwargs"] == {"fps": fps, "robot_type": "koch"}
        for episode, (length, frames) in enumerate(zip(lengths, flat_frames(lengths))):
            demo = file[f"data/demo_{episode}"]
            assert demo.attrs["instruction"] == tasks[episode]
            np.testing.assert_array_equal(demo["obs/state"][:, 0], np.arange(length))
            np.testing.assert_array_equal(demo["actions"][:, 1], (-np.arange(length) / 10).astype(np.float32))
            np.testing.assert_array_equal(demo["rewards"][()], np.arange(length) == length - 1)
            assert demo["obs/top_rgb"].shape == (length, 16, 16, 3)
            assert np.abs(demo["obs/top_rgb"][:, 8, 8, 0].astype(int) - frames[:, 8, 8, 0]).max() <= 3


def test_folder_made_by_lerobot_converts_and_trains(tmp_path, capsys):
    main(["convert", str(LEROBOT_MADE), str(tmp_path / "made.hdf5"), "--image-size", "16"])
    out = capsys.readouterr().out
    assert "observation.images.front -> obs/front" in out and "3 episodes, 28 frames" in out
    with h5py.File(tmp_path / "made.hdf5") as file:
        demo = file["data/demo_1"]
        assert demo.attrs["instruction"] == "close the drawer"
        np.testing.assert_array_equal(demo["obs/state"][:, 0], np.arange(9))  # written as [t, episode, 0.5]
        assert demo["obs/wrist"].shape == (9, 16, 16, 3)
        assert demo["obs/wrist"][:, 2, 8].min() == 255 and demo["obs/wrist"][:, -2, 8].max() == 0  # top half white
    with h5py.File(open_demo_file(LEROBOT_MADE).filename) as file:  # the cached conversion, full size
        front = file["data/demo_0/obs/front"][:, 16, 16, 0].astype(int)
        assert np.abs(front - 16 * np.arange(12)).max() <= 4  # each frame found by its timestamp
    main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--data.paths", f"[{LEROBOT_MADE}]",
          "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--data.batch_size", "4",
          "--trainer.default_root_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_inspect_reads_a_folder_through_one_cached_conversion(tmp_path, capsys):
    folder = tmp_path / "tiny"
    shutil.copytree(LEROBOT_MADE, folder)
    main(["inspect", str(folder), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(folder) and summary["demos"] == 3 and summary["total_steps"] == 28
    cached = list((tmp_path / "cache" / "lerobot").glob("tiny-*.hdf5"))
    assert len(cached) == 1
    with open_demo_file(folder) as file:
        assert Path(file.filename) == cached[0]
    info = folder / "meta" / "info.json"
    info.write_text(info.read_text().replace('"robot_type": null', '"robot_type": "so101"'))
    with open_demo_file(folder) as file:  # an edited folder converts again
        assert json.loads(file["data"].attrs["env_args"])["env_kwargs"]["robot_type"] == "so101"
    assert len(list((tmp_path / "cache" / "lerobot").glob("tiny-*.hdf5"))) == 2


def test_keys_and_renames_choose_what_is_converted(tmp_path, capsys):
    original = demo_file_with_cameras(tmp_path / "demos.hdf5")
    lerobot_folder = tmp_path / "lerobot"
    hdf5_to_lerobot(original, lerobot_folder, images="image", rename={"obs/state": "observation.joints"})
    report = lerobot_to_hdf5(lerobot_folder, tmp_path / "some.hdf5", keys=["action", "observation.joints"],
                             rename={"observation.joints": "obs/proprio"})
    assert report.names == {"action": "actions", "observation.joints": "obs/proprio"}
    with h5py.File(tmp_path / "some.hdf5") as file:
        assert list(file["data/demo_0/obs"]) == ["proprio"] and "states" not in file["data/demo_0"]
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(lerobot_folder), str(tmp_path / "x.hdf5"), "--keys", "action,observation.nothing"])
    assert exit_info.value.code == 2 and "no 'observation.nothing' to choose or rename" in capsys.readouterr().err


MALFORMED = {
    "missing info.json": (lambda folder: (folder / "meta" / "info.json").unlink(), "no meta/info.json"),
    "unknown codebase_version": (lambda folder: _edit_info(folder, codebase_version="v1.6"),
                                 "codebase_version 'v1.6' is not one lcbc reads"),
    "feature missing from the parquet": (
        lambda folder: _edit_info(folder, features={**_info(folder)["features"], "observation.effort": {
            "dtype": "float32", "shape": [2], "names": None}}),
        "data/chunk-000/file-000.parquet: feature 'observation.effort' of meta/info.json is not a column"),
    "video shorter than its timestamps": (
        lambda folder: write_video(folder / "videos/observation.images.front/chunk-000/file-000.mp4",
                                   np.zeros((25, 32, 32, 3), np.uint8), 10),
        "observation.images.front: episode 2 needs a frame at 2.500 s but the video ends at 2.400 s"),
}


def _info(folder: Path) -> dict:
    return json.loads((folder / "meta" / "info.json").read_text())


def _edit_info(folder: Path, **fields) -> None:
    (folder / "meta" / "info.json").write_text(json.dumps(_info(folder) | fields))


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_malformed_folder_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, command):
    folder = tmp_path / "broken"
    shutil.copytree(LEROBOT_MADE, folder)
    how, expected = MALFORMED[case]
    how(folder)
    before = folder_digest(folder)
    out = tmp_path / "out" / "converted.hdf5"
    out.parent.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(folder), str(out)] if command == "convert" else ["inspect", str(folder)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"lcbc: error: {folder}") and expected in error[0], error
    assert list(out.parent.iterdir()) == [] and not list((tmp_path / "cache").rglob("*.hdf5*"))
    assert folder_digest(folder) == before


def test_an_existing_destination_is_kept_without_overwrite(tmp_path, capsys):
    original = write_demo_file(tmp_path / "demos.hdf5", instructions=["open the drawer"])
    (tmp_path / "lerobot").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(original), str(tmp_path / "lerobot")])
    assert exit_info.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    main(["convert", str(original), str(tmp_path / "lerobot"), "--overwrite", "--images", "image"])
    assert (tmp_path / "lerobot" / "meta" / "info.json").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary left behind
