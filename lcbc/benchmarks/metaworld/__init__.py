"""The Meta-World plug-in: `--benchmark metaworld:MT10` (or MT50, or comma-separated task names).

Tasks and instructions (instructions.json: the canonical instruction, then paraphrases), environments
(env.py), goal splits (env.SPLIT_SEEDS), the scripted experts that ship inside `metaworld`, the goal
interface of reach, push and pick-place, a scorer of stored simulator states (scorer.py) and its own
window augmentations (augment.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from lcbc.benchmark import Benchmark
from lcbc.benchmarks.metaworld.env import (
    ACHIEVED_GOAL_IN_STATE,
    GOAL_IN_STATE,
    ROBOT_STATE_DIM,
    MetaWorldEnv,
    scripted_expert,
    split_goal,
)
from lcbc.errors import UserError

# The success radius of each task with a free goal: reach's fingertips and push's puck within 5 cm,
# pick-place's puck within 7 cm (Meta-World v3's own evaluate_state).
SUCCESS_RADIUS = {"reach-v3": 0.05, "push-v3": 0.05, "pick-place-v3": 0.07}
# MT10 tasks that share a scene: the same physics (reach/push/pick-place XML files differ only in the
# goal site's position and colour; drawer-open/close and window-open/close load the same file; a test
# compares the compiled models) and a goal variation vector that means the same in each (object xyz and
# goal xyz; drawer xyz; window xyz). A stored state is a valid state of every task of its scene.
SCENES = (("reach-v3", "push-v3", "pick-place-v3"), ("drawer-open-v3", "drawer-close-v3"),
          ("window-open-v3", "window-close-v3"))

# Tasks of one scene that undo each other, both ways: reset-free practice alternates them.
REVERSES = {"drawer-open-v3": "drawer-close-v3", "window-open-v3": "window-close-v3"}
REVERSES.update({second: first for first, second in REVERSES.items()})


@functools.cache
def instruction_table() -> dict[str, tuple[str, ...]]:
    table = json.loads((Path(__file__).parent / "instructions.json").read_text())
    return {task: tuple(texts) for task, texts in table.items()}


def suite_tasks(spec: str) -> list[str]:
    """Task names for 'MT10', 'MT50' or a comma-separated list of task names."""
    from metaworld import env_dict

    if spec.upper() in ("MT10", ""):
        return list(env_dict.MT10_V3.keys())
    if spec.upper() == "MT50":
        return list(env_dict.MT50_V3.keys())
    tasks = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in tasks if name not in env_dict.ALL_V3_ENVIRONMENTS]
    if unknown or not tasks:
        from lcbc.benchmark import known_benchmarks

        raise UserError(f"--benchmark: {unknown[0] if unknown else spec!r} is neither a benchmark "
                        f"({', '.join(known_benchmarks())}) nor a Meta-World suite (MT10, MT50) or task "
                        "(like drawer-open-v3)")
    return tasks


class MetaWorld(Benchmark):
    cameras = ("corner", "corner2", "corner3", "topview", "gripperPOV")
    goal_tasks = tuple(ACHIEVED_GOAL_IN_STATE)
    goal_dim = 3

    def __init__(self, suite: str = "MT10"):
        self.tasks = suite_tasks(suite)
        self.name = f"metaworld:{suite or 'MT10'}"

    def instructions(self, task: str) -> tuple[str, ...]:
        table = instruction_table()
        if task not in table:
            raise UserError(f"{task!r} is not a Meta-World v3 task")
        return table[task]

    def goal(self, task: str, split: str, index: int):
        return split_goal(task, self.check_split(split), index)

    def make_env(self, task: str, cameras: tuple[str, ...] = (), image_size: int = 64) -> MetaWorldEnv:
        return MetaWorldEnv(task, cameras=cameras, image_size=image_size)

    def expert(self, task: str):
        expert = scripted_expert(task)
        return lambda obs: expert.get_action(obs["state"])

    def state_observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        return {"state": state, "robot_state": state[..., :ROBOT_STATE_DIM]}

    def achieved_goal(self, task: str, state: np.ndarray) -> np.ndarray:
        start, offset = ACHIEVED_GOAL_IN_STATE[task]
        return state[..., start:start + 3] + np.asarray(offset, dtype=state.dtype)

    def desired_goal(self, state: np.ndarray) -> np.ndarray:
        return state[..., GOAL_IN_STATE]

    def with_goal(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        state = np.array(state)
        state[..., GOAL_IN_STATE] = goal
        return state

    def goal_reached(self, task: str, achieved: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return np.linalg.norm(np.asarray(achieved) - np.asarray(goal), axis=-1) <= SUCCESS_RADIUS[task]

    def scene(self, task: str) -> tuple[str, ...]:
        return next((scene for scene in SCENES if task in scene), (task,))

    def reverse(self, task: str) -> str | None:
        return REVERSES.get(task)

    def scorer(self, tasks: list[str]):
        from lcbc.benchmarks.metaworld.scorer import SimulatorScorer

        return SimulatorScorer(tasks)


def benchmark(suite: str) -> MetaWorld:
    return MetaWorld(suite)
