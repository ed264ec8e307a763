"""Roll policies out on a benchmark and measure success per task (and per phrasing).

Many environments are stepped together with one batched policy call per step: every task gets
`envs_per_task` environments, each runs its share of the split's goals one after another, and a
finished environment takes the next goal of its task while the others keep going. Success is the
environment's own `info["success"]` at any step; the horizon is its `max_episode_steps`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass(frozen=True)
class Job:
    task: str
    instruction: str
    episode: int


@dataclass
class EvalResult:
    successes: dict[tuple[str, str], list[bool]] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def success_rate(self, task: str, instruction: str | None = None) -> float:
        runs = [s for (t, i), values in self.successes.items() if t == task and instruction in (None, i)
                for s in values]
        return float(np.mean(runs)) if runs else float("nan")


class PolicyActor:
    """Adapts a LanguagePolicy to the rollout loop: language, one-hot or goal conditioning."""

    def __init__(self, policy):
        self.policy = policy

    def reset(self, done: np.ndarray) -> None:
        self.policy.reset_envs(done)

    def __call__(self, observations: dict, jobs: list[Job]) -> np.ndarray:
        mode = self.policy.config["task_mode"]
        if mode == "language":
            return self.policy.act_batch(observations, instructions=[job.instruction for job in jobs])
        if mode == "onehot":
            ids = [self.policy.task_encoder.task_index(job.task) for job in jobs]
            return self.policy.act_batch(observations, task_ids=ids)
        raise ValueError("goal-conditioned policies need goal observations; benchmark rollouts give tasks")


class ExpertActor:
    """The benchmark's scripted expert for each environment's task: the reference beside every policy."""

    def __init__(self, benchmark):
        self.benchmark = benchmark
        self.experts: dict[str, object] = {}

    def reset(self, done: np.ndarray) -> None:
        pass

    def __call__(self, observations: dict, jobs: list[Job]) -> np.ndarray:
        actions = []
        for i, job in enumerate(jobs):
            if job.task not in self.experts:
                self.experts[job.task] = self.benchmark.expert(job.task)
            actions.append(self.experts[job.task]({key: value[i] for key, value in observations.items()}))
        return np.asarray(actions)


def rollout(actor, benchmark, episodes: int, instructions: dict[str, list[str]] | None = None,
            split: str = "validation", envs_per_task: int = 10, camera: str | None = None, image_size: int = 64,
            progress: bool = True, tasks: list[str] | None = None) -> EvalResult:
    """Run the first `episodes` goals of `split` for each of the benchmark's tasks (or `tasks`), and each
    phrasing when `instructions` is given; `camera` renders images for pixel policies."""
    warnings.filterwarnings("ignore", message="Constant")
    tasks = list(tasks or benchmark.tasks)
    phrasings = {task: (instructions or {}).get(task) or [benchmark.canonical_instruction(task)] for task in tasks}
    queues = {task: [Job(task, text, e) for text in phrasings[task] for e in range(episodes)] for task in tasks}
    total = sum(len(queue) for queue in queues.values())
    slots = [(_borrow_env(benchmark, task, camera, image_size), task)
             for task in tasks for _ in range(min(envs_per_task, len(queues[task])))]
    result = EvalResult()
    jobs: list[Job | None] = [None] * len(slots)
    observations: list[dict | None] = [None] * len(slots)

    def start_next(i: int) -> None:
        env, task = slots[i]
        jobs[i] = queues[task].pop(0) if queues[task] else None
        if jobs[i] is not None:
            goal = benchmark.goal(task, split, jobs[i].episode)
            observations[i], _ = env.reset(options={"goal": goal})

    for i in range(len(slots)):
        start_next(i)
    steps_taken = np.zeros(len(slots), dtype=int)
    started = time.perf_counter()
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        progress_task = bar.add_task("eval", total=total)
        actor.reset(np.ones(len(slots), dtype=bool))
        while any(job is not None for job in jobs):
            # Every slot is in the batch (finished ones with their last observation) so the policy's
            # history rows stay aligned with the environments; only active slots are stepped.
            batch = {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
            actions = actor(batch, [job or Job(task, benchmark.canonical_instruction(task), -1)
                                    for job, (_, task) in zip(jobs, slots)])
            finished = np.zeros(len(slots), dtype=bool)
            for i, job in enumerate(jobs):
                if job is None:
                    continue
                env = slots[i][0]
                observations[i], _, terminated, truncated, info = env.step(
                    np.clip(actions[i], env.action_space.low, env.action_space.high))
                steps_taken[i] += 1
                result.steps += 1
                if info["success"] or terminated or truncated or steps_taken[i] >= env.max_episode_steps:
                    result.successes.setdefault((job.task, job.instruction), []).append(bool(info["success"]))
                    finished[i] = True
                    steps_taken[i] = 0
                    bar.advance(progress_task)
            if finished.any():
                actor.reset(finished)
                for i in np.flatnonzero(finished):
                    start_next(i)
    result.seconds = time.perf_counter() - started
    for env, task in slots:
        _IDLE_ENVS.setdefault((benchmark.name, task, camera, image_size), []).append(env)
    return result


# Building an environment can be slow (a Meta-World one parses its MuJoCo model: ~0.3 s each, 100 for an
# MT10 evaluation); rollouts in one process (the policy's, then the expert's on the same goals) reuse
# them. Every episode resets onto its goal, so nothing carries over between rollouts.
_IDLE_ENVS: dict[tuple, list] = {}


def _borrow_env(benchmark, task: str, camera: str | None, image_size: int):
    idle = _IDLE_ENVS.get((benchmark.name, task, camera, image_size))
    return idle.pop() if idle else benchmark.make_env(task, camera=camera, image_size=image_size)
