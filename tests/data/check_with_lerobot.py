"""Reads an lcbc-written LeRobot folder with LeRobot's own LeRobotDataset and compares every frame with the
arrays it came from (an .npz of flat arrays named by LeRobot feature, rows in dataset order).

Run in a venv with lerobot 0.4.4 (docs/LEROBOT.md): python check_with_lerobot.py FOLDER REFERENCE.npz
"""
import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

folder, reference = sys.argv[1], np.load(sys.argv[2])
dataset = LeRobotDataset("local/lcbc_check", root=folder)
items = [dataset[i] for i in range(len(dataset))]
print(f"{folder}: {len(items)} frames, tasks {list(dataset.meta.tasks.index)}")
for name in reference.files:
    values = np.stack([item[name].numpy() for item in items])
    if values.ndim == 4:  # LeRobot hands out cameras as (3, H, W) floats in [0, 1]
        values = np.round(values.transpose(0, 2, 3, 1) * 255)
    error = np.abs(values.astype(np.float64) - reference[name].reshape(values.shape)).max()
    mean = np.abs(values.astype(np.float64) - reference[name].reshape(values.shape)).mean()
    print(f"  {name}: max abs difference {error:g}, mean {mean:.3f}")
print("  tasks of frames:", sorted({item["task"] for item in items}))
