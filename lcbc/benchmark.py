"""The benchmark interface: what every stage beyond training needs to know about a simulator, and the registry.

A benchmark names its tasks and their instructions, makes a gymnasium environment for a task, and hands
out goal variations (where objects and goals are placed) from three splits: `train` (demonstrations and
fine-tuning practice), `validation` (choosing recipes) and `test` (the numbers a results page reports).
Everything else is optional: a scripted expert (for `lcbc collect` and as the reference in `lcbc eval`),
a goal interface for hindsight relabeling, a scorer that scores stored simulator states for any task of
a scene (reward relabeling across tasks), and the benchmark's own window augmentations (classes a config
names under `data.augmentation` or `model.actor_augmentation`).

The environment a benchmark makes follows gymnasium: `reset(options={"goal": goal})` starts an episode
on a goal variation, `step` returns `info["success"]` (a bool), observations are dicts (a flat float
`state` for state policies, `<camera>_rgb` uint8 images for each camera it was made with), and the attribute
`max_episode_steps` is the horizon. `simulator_state()`, when present, is stored for replay scoring.

Tasks that share a scene (`scene`) differ only in what is asked, so one episode can be scored for all of them.
An environment that can do so reports `info["scene_success"]` from `reset` and every `step`: a dict, task ->
bool, whether each scene task's goal holds now. `lcbc eval --obedience` (which task's goal does each
instruction reach?) and chained requests need it. Chains (`lcbc eval --chain`, several instructions to
`lcbc act`) also need `can_follow` pairs and an environment method `restart_step_limit()`: each request of
a chain gets `max_episode_steps` steps of its own in the same episode.

Reset-free practice (`lcbc finetune --reset-free`) alternates tasks that undo each other (`reverse`: open and
close a drawer) without resetting: it needs an environment method `switch_task(task)` that goes on from the
current physical state as another task of the scene with a fresh step limit, returns the observation, and
sets the environment's `goal` attribute to that task's goal variation of the scene (what its episodes are
stored and scored with).

Benchmarks are found by name: `metaworld:MT10` or `libero:goal` (a registered name, a colon, the name's own
argument), or `MT10`, `MT50` and Meta-World task names for short, or `my_package.my_module:ARG` for a module that
defines `benchmark(arg) -> Benchmark`. `register_benchmark` adds a name from Python, and installed
packages can add one through the `lcbc.benchmarks` entry-point group.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from lcbc.errors import UserError

SPLITS = ("train", "validation", "test")


class Benchmark:
    """Subclass this to bring a simulator; see the module docstring and README's "Adding a benchmark"."""

    name: str = "benchmark"
    tasks: list[str] = []
    cameras: tuple[str, ...] = ()  # camera names make_env accepts; the first renders videos
    # The goal interface (optional): tasks whose goal is a free point written into the state, its size.
    goal_tasks: tuple[str, ...] = ()
    goal_dim: int = 0

    def instructions(self, task: str) -> tuple[str, ...]:
        """The canonical instruction first (written into collected demos), then paraphrases."""
        raise NotImplementedError

    def goal(self, task: str, split: str, index: int):
        """The `index`-th goal variation of `task` in `split`; every index gives a new one."""
        raise NotImplementedError

    def make_env(self, task: str, cameras: tuple[str, ...] = (), image_size: int = 64):
        """A gymnasium environment for `task` whose observations hold an image from each of `cameras`; reset
        it with `options={"goal": self.goal(...)}`."""
        raise NotImplementedError

    def expert(self, task: str) -> Callable[[dict], np.ndarray] | None:
        """A scripted expert: observation dict -> action, or None when the benchmark has none."""
        return None

    def state_observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """The policy's low-dimensional observation keys from the flat `state` fine-tuning stores."""
        return {"state": state}

    # ---- the goal interface, for hindsight relabeling (tasks in goal_tasks) -------------------------

    def achieved_goal(self, task: str, state: np.ndarray) -> np.ndarray:
        """(..., goal_dim): the goal each (..., D) state has achieved."""
        raise NotImplementedError

    def desired_goal(self, state: np.ndarray) -> np.ndarray:
        """(..., goal_dim): the goal each (..., D) state asks for (what `with_goal` writes)."""
        raise NotImplementedError

    def with_goal(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """A copy of the (..., D) states with `goal` written in as the goal they are asked to reach."""
        raise NotImplementedError

    def goal_reached(self, task: str, achieved: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """(...) bool: success for each achieved goal against its goal, as the task's own success measures."""
        raise NotImplementedError

    # ---- scoring stored simulator states, for reward relabeling across a scene's tasks --------------

    def scene(self, task: str) -> tuple[str, ...]:
        """The tasks that share `task`'s scene: a stored state of one is a valid state of each."""
        return (task,)

    def scorer(self, tasks: list[str]):
        """What rescores stored episodes, or None: episodes are then stored as observed, with goal relabels
        through the goal interface and no task relabels. It has `obs_dim`, `action_dim`, `state_size(task)`,
        `score(task, goal, episode, goals=None) -> lcbc.rl.replay.Scores` and `final_state(task, goal,
        states, actions)` (the simulator state after a demo's last step); Meta-World's is
        lcbc.benchmarks.metaworld.scorer.SimulatorScorer."""
        return None

    def can_follow(self, first: str, second: str) -> bool:
        """Whether `second` may be asked for in the same episode once `first`'s goal is reached, with neither
        goal needing or undoing the other (see the module docstring). No pair by default: no chains."""
        return False

    def reverse(self, task: str) -> str | None:
        """The task of `task`'s scene that undoes its goal (drawer-close for drawer-open), or None: reset-free
        practice alternates the two (see the module docstring)."""
        return None

    def canonical_instruction(self, task: str) -> str:
        return self.instructions(task)[0]

    def check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise UserError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
        return split


_REGISTRY: dict[str, Callable[[str], Benchmark]] = {}
_BUILT_IN = {"metaworld": "lcbc.benchmarks.metaworld", "libero": "lcbc.benchmarks.libero"}
DEFAULT = "metaworld"  # bare suites and task names (MT10, reach-v3) belong to it


def register_benchmark(name: str, factory: Callable[[str], Benchmark]) -> None:
    """Make `--benchmark name:ARG` build `factory(ARG)` (ARG is '' when no colon is given)."""
    _REGISTRY[name] = factory


def _factory(name: str) -> Callable[[str], Benchmark] | None:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILT_IN:
        return importlib.import_module(_BUILT_IN[name]).benchmark
    from importlib.metadata import entry_points

    for entry in entry_points(group="lcbc.benchmarks"):
        if entry.name == name:
            return entry.load()
    if "." in name:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise UserError(f"--benchmark: cannot import {name} ({error})") from None
        if not callable(getattr(module, "benchmark", None)):
            raise UserError(f"--benchmark: module {name} defines no benchmark(arg) function")
        return module.benchmark
    return None


def load_benchmark(spec: str) -> Benchmark:
    """The benchmark a `--benchmark` value names (see the module docstring)."""
    if not spec or not spec.strip():
        raise UserError("--benchmark: empty; use e.g. metaworld:MT10")
    name, colon, argument = spec.strip().partition(":")
    factory = _factory(name)
    if factory is None:
        factory, argument = _factory(DEFAULT), spec.strip()
    return factory(argument)


def known_benchmarks() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILT_IN))
