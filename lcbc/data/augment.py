"""Augmentations of training windows: the interfaces a config's augmentation classes implement, and the
generic ones. A benchmark plug-in's own implement the same interfaces and are named in a config by class
path, so the loader and the fine-tuning stage know no benchmark.
"""

from __future__ import annotations

import numpy as np

from lcbc.errors import UserError


class WindowAugmentation:
    """Changes a training batch of DemoDataset windows in place (`data.augmentation` in a config).

    `bind` is called once with the training DemoDataset (its tasks, demo boundaries and low-dimensional
    arrays), before any batch; `__call__` gets the numpy batch (`obs` windows (B, H, ...), `task_id`, ...),
    the global steps the windows end at, and the dataset's random generator."""

    def bind(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, batch: dict, steps: np.ndarray, rng: np.random.Generator) -> None:
        raise NotImplementedError


class StateGoalRelabeling(WindowAugmentation):
    """Hindsight goals for cloning, through a benchmark's goal interface (`data.relabel_state_goals`): a
    `share` of the windows of its goal tasks (a free goal written into the state) ask, in every frame, for
    the goal that a later step of the same demo achieved instead of the demo's own. The demo's actions up to
    that step lead there, so a few demos teach many goals. It reads only what the benchmark defines
    (`goal_tasks`, `achieved_goal`, `with_goal`), as fine-tuning's hindsight relabels do."""

    def __init__(self, benchmark, share: float, key: str = "state"):
        if not 0 <= share <= 1:
            raise UserError(f"data.relabel_state_goals must be a share in [0, 1], got {share}")
        self.benchmark, self.share, self.key = benchmark, share, key

    def bind(self, dataset) -> None:
        """Data without any of the benchmark's goal tasks is left as it is."""
        super().bind(dataset)
        self.goal_task = np.array([task in self.benchmark.goal_tasks for task in dataset.tasks])
        if self.goal_task.any() and self.key not in dataset.low_dim:
            raise UserError(f"data.relabel_state_goals: the data has no {self.key!r} observations to write goals into")

    def __call__(self, batch: dict, steps: np.ndarray, rng: np.random.Generator) -> None:
        data = self.dataset
        demo = data.step_demo[steps]
        task, last = data.demo_task[demo], data.demo_end[demo] - 1
        chosen = self.goal_task[task] & (steps < last) & (rng.random(len(steps)) < self.share)
        later = rng.integers(steps + 1, np.maximum(last, steps + 1), endpoint=True)
        windows = batch["obs"][self.key]
        for index in np.unique(task[chosen]):
            rows = np.flatnonzero(chosen & (task == index))
            achieved = self.benchmark.achieved_goal(data.tasks[index], data.low_dim[self.key][later[rows]])
            goals = np.repeat(achieved[:, None], windows.shape[1], axis=1).astype(windows.dtype)
            windows[rows] = self.benchmark.with_goal(windows[rows], goals)


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
