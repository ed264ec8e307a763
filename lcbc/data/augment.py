"""Augmentations of training windows: the interfaces a config's augmentation classes implement, and the
generic ones. A benchmark plug-in's own implement the same interfaces and are named in a config by class
path, so the loader and the fine-tuning stage know no benchmark.
"""

from __future__ import annotations

import numpy as np


class WindowAugmentation:
    """Changes a training batch of DemoDataset windows in place (`data.augmentation` in a config).

    `bind` is called once with the training DemoDataset (its tasks, demo boundaries and low-dimensional
    arrays), before any batch; `__call__` gets the numpy batch (`obs` windows (B, H, ...), `task_id`, ...),
    the global steps the windows end at, and the dataset's random generator."""

    def bind(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, batch: dict, steps: np.ndarray, rng: np.random.Generator) -> None:
        raise NotImplementedError


class ActorAugmentation:
    """Changes, in place, the (B, H, D) state windows the fine-tuning actor clones
    (`model.actor_augmentation`); the critics see the states as stored. `task` holds each row's index
    into `tasks`."""

    def __call__(self, windows: np.ndarray, task: np.ndarray, tasks: list[str], rng: np.random.Generator) -> None:
        raise NotImplementedError


def shift_images(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """(B, H, h, w, C) windows, each moved by one random offset of up to `pad` pixels in x and y, the same
    for all its frames (random shift, Yarats et al. 2021); the border pixels fill the uncovered strip."""
    height, width = images.shape[2:4]
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = rng.integers(0, 2 * pad, endpoint=True, size=(len(images), 2))
    return np.stack([window[:, y:y + height, x:x + width] for window, (y, x) in zip(padded, offsets)])
