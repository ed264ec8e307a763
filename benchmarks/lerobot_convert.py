"""LeRobot conversion speed, in frames per second, on a synthetic 64 px two-camera dataset.

Usage (from the repository root, in the project venv):

    .venv/bin/python benchmarks/lerobot_convert.py --out docs/BENCHMARKS.md

The dataset: `--demos` demos of `--steps` steps, a 7-d state, 7-d actions and two 64 x 64 cameras whose
frames move smoothly (a shifting gradient plus noise), roughly what a simulator renders. Each direction is
timed `--repeats` times, interleaved, and the median is reported: HDF5 -> LeRobot with cameras as AV1
videos (LeRobot's default) and as PNG images, and each of those folders back to HDF5.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
from report import write_section

from lcbc.data.hdf5 import DemoWriter
from lcbc.data.lerobot import hdf5_to_lerobot, lerobot_to_hdf5


def write_dataset(path: Path, demos: int, steps: int, size: int = 64) -> int:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size]
    with DemoWriter(path, {"env_name": "synthetic", "env_type": 0, "env_kwargs": {"fps": 20}}) as writer:
        for demo in range(demos):
            t = np.arange(steps)[:, None, None]
            cameras = {}
            for name, speed in (("agentview_rgb", 1), ("wrist_rgb", 3)):
                base = (x[None] * 2 + y[None] + speed * t * 2 + 40 * demo) % 256
                images = np.stack([base, (base + 85) % 256, (base + 170) % 256], -1)
                cameras[name] = np.clip(images + rng.normal(0, 3, images.shape), 0, 255).astype(np.uint8)
            writer.add_demo(rng.uniform(-1, 1, (steps, 7)).astype(np.float32),
                            {"state": rng.normal(size=(steps, 7)).astype(np.float32), **cameras},
                            np.zeros(steps, np.float32), (np.arange(steps) == steps - 1).astype(np.int64),
                            instruction=f"task {demo % 5}")
    return demos * steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="markdown file whose '## LeRobot conversion' section is (re)written")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="lerobot_convert_"))
    try:
        source = work / "source.hdf5"
        frames = write_dataset(source, args.demos, args.steps)
        cases = {
            "HDF5 -> LeRobot, cameras as AV1 video (libsvtav1)":
                lambda: hdf5_to_lerobot(source, work / "video", images="video", overwrite=True),
            "HDF5 -> LeRobot, cameras as PNG images":
                lambda: hdf5_to_lerobot(source, work / "image", images="image", overwrite=True),
            "LeRobot (AV1 video) -> HDF5": lambda: lerobot_to_hdf5(work / "video", work / "back.hdf5", overwrite=True),
            "LeRobot (PNG images) -> HDF5": lambda: lerobot_to_hdf5(work / "image", work / "back.hdf5", overwrite=True),
        }
        seconds = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, convert in cases.items():
                seconds[name].append(convert().seconds)
        sizes = {name: sum(path.stat().st_size for path in (work / name).rglob("*") if path.is_file())
                 for name in ("video", "image")}
    finally:
        shutil.rmtree(work)
    rows = [f"| {name} | {frames / statistics.median(times):,.0f} | {frames / max(times):,.0f}-"
            f"{frames / min(times):,.0f} |" for name, times in seconds.items()]
    section = "\n".join([
        "## LeRobot conversion",
        "",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
        f"jobs: 1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end); Python "
        f"{platform.python_version()}.",
        "",
        "Command:",
        "",
        "```",
        f".venv/bin/python benchmarks/lerobot_convert.py --demos {args.demos} --steps {args.steps} "
        f"--repeats {args.repeats} --out docs/BENCHMARKS.md",
        "```",
        "",
        f"{args.demos} demos x {args.steps} steps = {frames:,} frames, each with two 64 x 64 cameras, a 7-d state "
        f"and 7-d actions; median (min-max) over {args.repeats} interleaved repeats, in frames per second (one "
        "frame = one step with both cameras). Folder sizes: "
        f"{sizes['video'] / 2**20:.1f} MB with videos, {sizes['image'] / 2**20:.1f} MB with PNG images.",
        "",
        "| Conversion | frames/s (median) | min-max |",
        "|---|---:|---:|",
        *rows,
        "",
    ])
    print(section)
    if args.out:
        write_section(Path(args.out), section)


if __name__ == "__main__":
    main()
