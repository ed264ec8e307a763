"""Writes a tiny LeRobot v3.0 dataset with LeRobot's own LeRobotDataset, images SIZE pixels square.

Run in a venv with lerobot 0.4.4 (docs/LEROBOT.md): python make_lerobot_dataset.py FOLDER SIZE
"""
import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, size = sys.argv[1], int(sys.argv[2])
features = {
    "observation.state": {"dtype": "float32", "shape": (3,), "names": ["x", "y", "z"]},
    "action": {"dtype": "float32", "shape": (2,), "names": ["dx", "dy"]},
    "observation.images.front": {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]},
    "observation.images.wrist": {"dtype": "image", "shape": (size, size, 3), "names": ["height", "width", "channels"]},
}
dataset = LeRobotDataset.create("lcbc/tiny_lerobot", fps=10, features=features, root=root, use_videos=True)
for episode, (length, task) in enumerate(((12, "open the drawer"), (9, "close the drawer"), (7, "open the drawer"))):
    for t in range(length):
        front = np.full((size, size, 3), 16 * (t % 16), np.uint8)  # flat frames: a video codec keeps them nearly exact
        front[:, :, 1] = 40 * episode
        wrist = np.zeros((size, size, 3), np.uint8)
        wrist[: size // 2] = 255  # top half white: shows the orientation survives
        wrist[0, 0] = (t, episode, 7)
        dataset.add_frame({"observation.state": np.array([t, episode, 0.5], np.float32),
                           "action": np.array([t / 10, -1.0], np.float32),
                           "observation.images.front": front, "observation.images.wrist": wrist, "task": task})
    dataset.save_episode()
dataset.finalize()
