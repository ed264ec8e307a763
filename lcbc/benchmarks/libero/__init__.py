"""The LIBERO plug-in: `--benchmark libero:goal` (or spatial, object, 10, 90), or some of a suite's tasks:
`libero:goal:turn-on-the-stove,put-the-bowl-on-the-plate`.

Tasks are LIBERO's, named by their BDDL problem with hyphens (turn-on-the-stove); the canonical instruction is
LIBERO's own sentence, paraphrases (paraphrases.json) follow it. Goal variations: train and validation are
LIBERO's placement sampler under disjoint seeds, test is the 50 official initial states per task (env.py).
LIBERO-Goal's ten tasks share one scene, so only the words tell them apart.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from lcbc.benchmark import Benchmark
from lcbc.benchmarks.libero.env import (
    CAMERAS,
    MAX_EPISODE_STEPS,
    SUITES,
    LiberoEnv,
    bddl_path,
    goal_objects,
    goal_predicates,
    scene_layout,
    split_goal,
    suite,
)
from lcbc.errors import UserError


@functools.cache
def paraphrases() -> dict[str, tuple[str, ...]]:
    table = json.loads((Path(__file__).parent / "paraphrases.json").read_text())
    return {task: tuple(texts) for task, texts in table.items()}


def task_id(libero_task) -> str:
    return libero_task.name.lower().replace("_", "-")


class Libero(Benchmark):
    cameras = CAMERAS

    def __init__(self, suite_name: str = "goal", tasks: list[str] | None = None):
        if suite_name not in SUITES:
            raise UserError(f"--benchmark libero:{suite_name}: LIBERO's suites here are "
                            f"{', '.join(f'libero:{name}' for name in SUITES)}")
        self.suite = SUITES[suite_name]
        self._tasks = {task_id(task): (index, task) for index, task in enumerate(suite(self.suite).tasks)}
        for task in tasks or ():
            self._task(task)  # names the suite's tasks when one is not among them
        self.tasks = list(tasks or self._tasks)
        self.name = f"libero:{suite_name}" + (f":{','.join(tasks)}" if tasks else "")

    def _task(self, task: str):
        if task not in self._tasks:
            raise UserError(f"{task!r} is not a task of LIBERO's {self.suite} ({', '.join(self._tasks)})")
        return self._tasks[task]

    def instructions(self, task: str) -> tuple[str, ...]:
        return (self._task(task)[1].language, *paraphrases().get(task, ()))

    def goal(self, task: str, split: str, index: int):
        return split_goal(self.suite, self._task(task)[0], self.check_split(split), index)

    def make_env(self, task: str, cameras: tuple[str, ...] = (), image_size: int = 64) -> LiberoEnv:
        scene_goals = {other: goal_predicates(self._bddl(other)) for other in self.scene(task)}
        return LiberoEnv(self._task(task)[1], MAX_EPISODE_STEPS[self.suite], scene_goals, cameras=cameras,
                         image_size=image_size)

    def _bddl(self, task: str) -> str:
        return bddl_path(self._task(task)[1])

    def expert(self, task: str):
        from lcbc.benchmarks.libero.experts import EXPERTS, Expert

        rules = EXPERTS.get(task) if self.suite == "libero_goal" else None
        return Expert(rules, self.layout(task)) if rules else None

    def layout(self, task: str):
        """Where each part of the scene sits in the flat `state` (env.StateLayout)."""
        return scene_layout(self._bddl(task))

    def state_observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        return {"state": state, "robot_state": state[..., :self.layout(self.tasks[0]).robot_size]}

    def scene(self, task: str) -> tuple[str, ...]:
        """LIBERO-Goal's tasks share one scene; in the other suites each task is its own."""
        return tuple(self.tasks) if self.suite == "libero_goal" else (task,)

    def can_follow(self, first: str, second: str) -> bool:
        """Two tasks of a scene whose goals involve disjoint objects (env.goal_objects): doing the second
        neither needs nor undoes the first (turn on the stove, then open the middle drawer)."""
        return (first != second and second in self.scene(first)
                and not goal_objects(self._bddl(first)) & goal_objects(self._bddl(second)))


def benchmark(argument: str) -> Libero:
    """`goal`, or `goal:task-a,task-b` for some of its tasks."""
    suite_name, _, tasks = argument.partition(":")
    return Libero(suite_name or "goal", [task.strip() for task in tasks.split(",") if task.strip()])
