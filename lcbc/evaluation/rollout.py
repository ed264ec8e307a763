"""Roll policies out on a benchmark and measure success per task (and per phrasing).

Many environments are stepped together with one batched policy call per step: every task whose goal
variations episodes start on gets `envs_per_task` environments, each runs its share of the jobs one after
another, and a finished environment takes the next while the others keep going. The horizon is the
environment's `max_episode_steps`.

A job asks for a task; the episode ends when that task's goal is newly reached: it holds at a step and did
not hold when the request was made. Which goals hold comes from `info["scene_success"]` where the
environment reports it (every task of its scene), else from `info["success"]` for its own task. A job may
start on another task's goal variation of the same scene (`Job.start`: obedience runs ask for every task
from the same starts) and may chain further requests (`Job.then`): once the goal is reached the next
instruction is given in the same episode, with no reset and the policy's history kept, and it gets
`max_episode_steps` steps of its own (`env.restart_step_limit()`).

Simulators step on one core, so `workers` > 1 splits the jobs among that many processes, each with its own
copy of the actor and its own environments (whole start tasks to each worker where there are enough, so
none builds an environment another one also builds); their results are merged.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lcbc.errors import UserError


def progress_bar(progress: bool) -> Progress:
    """The evaluation's bar over episodes (hidden when `progress` is False)."""
    return Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress)


@dataclass(frozen=True)
class Job:
    """What the actor is asked now: a task ('' for none of the scene's), its instruction, and the index of
    the goal variation the episode started on, of task `start` when that is not `task`. `then` holds the
    (task, instruction) requests that follow in the same episode."""

    task: str
    instruction: str
    episode: int
    start: str = ""
    then: tuple[tuple[str, str], ...] = ()

    @property
    def start_task(self) -> str:
        return self.start or self.task

    @property
    def requests(self) -> list[tuple[str, str]]:
        return [(self.task, self.instruction), *self.then]

    def next_request(self) -> Job:
        (task, instruction), *rest = self.then
        return Job(task, instruction, self.episode, self.start_task, tuple(rest))


@dataclass
class Outcome:
    """One episode of a job: for each request made, the scene's tasks whose goals it newly reached, in order."""

    job: Job
    reached: list[list[str]]

    @property
    def completed(self) -> int:
        """How many of the job's requests were done, in order."""
        done = [task in reached for (task, _), reached in zip(self.job.requests, self.reached)]
        return done.index(False) if False in done else len(done)


@dataclass
class EvalResult:
    successes: dict[tuple[str, str], list[bool]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
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

    def __getstate__(self) -> dict:
        return {"benchmark": self.benchmark, "experts": {}}  # a worker process makes its own experts

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
            split: str = "validation", envs_per_task: int = 10, cameras: tuple[str, ...] = (), image_size: int = 64,
            progress: bool = True, tasks: list[str] | None = None, workers: int = 1) -> EvalResult:
    """Run the first `episodes` goals of `split` for each of the benchmark's tasks (or `tasks`), and each
    phrasing when `instructions` is given; `cameras` render images for pixel policies."""
    tasks = list(tasks or benchmark.tasks)
    asked = phrasings(benchmark, tasks, instructions)
    jobs = [Job(task, text, e) for task in tasks for text in asked[task] for e in range(episodes)]
    return run_jobs(actor, benchmark, jobs, split, envs_per_task, cameras, image_size, progress, workers=workers)


def phrasings(benchmark, tasks: list[str], instructions: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """Each task's instructions to try: those given for it, else the benchmark's canonical one."""
    return {task: (instructions or {}).get(task) or [benchmark.canonical_instruction(task)] for task in tasks}


def holding(info: dict, task: str) -> dict[str, bool]:
    """Which goals hold, from a reset's or a step's info: the scene's where reported, else the task's own."""
    if "scene_success" in info:
        return info["scene_success"]
    return {task: bool(info["success"])} if "success" in info else {}


def run_jobs(actor, benchmark, jobs: list[Job], split: str = "validation", envs_per_task: int = 10,
             cameras: tuple[str, ...] = (), image_size: int = 64, progress: bool = True,
             watch: Callable | None = None, workers: int = 1, finished: Callable | None = None) -> EvalResult:
    """Run every job (see the module docstring), `envs_per_task` environments per start task at a time, in
    `workers` processes. `watch(env, observation, action, info)` sees every reset (action None) and step (in
    this process only); `finished(outcome)` every episode's outcome."""
    if workers > 1 and len(jobs) > 1:
        if watch:
            raise ValueError("watch sees the environments of this process: run with workers=1")
        return _run_in_workers(actor, benchmark, jobs, split, envs_per_task, cameras, image_size, progress, workers)
    warnings.filterwarnings("ignore", message="Constant")
    queues: dict[str, list[Job]] = {}
    for job in jobs:
        queues.setdefault(job.start_task, []).append(job)
    slots = [(_borrow_env(benchmark, start, cameras, image_size), start)
             for start, queue in queues.items() for _ in range(min(envs_per_task, len(queue)))]
    result = EvalResult()
    first: list[Job | None] = [None] * len(slots)  # each slot's job as given; `current` is its request now
    current: list[Job | None] = [None] * len(slots)
    observations: list[dict | None] = [None] * len(slots)
    held_when_asked: list[set[str]] = [set() for _ in slots]
    reached: list[list[list[str]]] = [[] for _ in slots]
    steps_taken = np.zeros(len(slots), dtype=int)

    def start_next(i: int) -> None:
        env, start = slots[i]
        first[i] = current[i] = queues[start].pop(0) if queues[start] else None
        if first[i] is not None:
            observations[i], info = env.reset(options={"goal": benchmark.goal(start, split, first[i].episode)})
            goals = holding(info, start)
            unscored = [task for task, _ in first[i].requests if task and task != start and task not in goals]
            if unscored:
                raise UserError(f"{benchmark.name}: its environments report no info['scene_success'], so an "
                                f"episode in {start}'s scene cannot be scored for {unscored[0]}")
            held_when_asked[i], reached[i], steps_taken[i] = {t for t, held in goals.items() if held}, [[]], 0
            if watch:
                watch(env, observations[i], None, info)

    for i in range(len(slots)):
        start_next(i)
    started = time.perf_counter()
    with progress_bar(progress) as bar:
        progress_task = bar.add_task("eval", total=len(jobs))
        actor.reset(np.ones(len(slots), dtype=bool))
        while any(job is not None for job in current):
            # Every slot is in the batch (finished ones with their last observation) so the policy's
            # history rows stay aligned with the environments; only active slots are stepped.
            batch = {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
            actions = actor(batch, [job or Job(start, benchmark.canonical_instruction(start), -1)
                                    for job, (_, start) in zip(current, slots)])
            ended = np.zeros(len(slots), dtype=bool)
            for i, job in enumerate(current):
                if job is None:
                    continue
                env, start = slots[i]
                action = np.clip(actions[i], env.action_space.low, env.action_space.high)
                observations[i], _, terminated, truncated, info = env.step(action)
                if watch:
                    watch(env, observations[i], action, info)
                steps_taken[i] += 1
                result.steps += 1
                goals = holding(info, start)
                reached[i][-1] += [t for t, held in goals.items()
                                   if held and t not in held_when_asked[i] and t not in reached[i][-1]]
                if job.task in reached[i][-1] and job.then:  # the next request, in the same episode
                    current[i], held_when_asked[i] = job.next_request(), {t for t, held in goals.items() if held}
                    reached[i].append([])
                    steps_taken[i] = 0
                    env.restart_step_limit()
                elif job.task in reached[i][-1] or terminated or truncated or steps_taken[i] >= env.max_episode_steps:
                    outcome = Outcome(first[i], reached[i])
                    result.outcomes.append(outcome)
                    result.successes.setdefault((first[i].task, first[i].instruction), []).append(
                        outcome.completed > 0)
                    current[i], ended[i] = None, True
                    bar.advance(progress_task)
                    if finished:
                        finished(outcome)
            if ended.any():
                actor.reset(ended)
                for i in np.flatnonzero(ended):
                    start_next(i)
    result.seconds = time.perf_counter() - started
    for env, start in slots:
        _IDLE_ENVS.setdefault((benchmark.name, start, tuple(cameras), image_size), []).append(env)
    return result


def shard(jobs: list[Job], workers: int) -> list[list[Job]]:
    """`workers` non-empty shares of the jobs: whole start tasks dealt out, largest first, to the least loaded
    worker when there are at least as many start tasks as workers, else every start's jobs dealt round."""
    starts: dict[str, list[Job]] = {}
    for job in jobs:
        starts.setdefault(job.start_task, []).append(job)
    shares: list[list[Job]] = [[] for _ in range(min(workers, len(jobs)))]
    if len(starts) >= len(shares):
        for group in sorted(starts.values(), key=len, reverse=True):
            min(shares, key=len).extend(group)
    else:
        for k, job in enumerate(jobs):
            shares[k % len(shares)].append(job)
    return shares


def _worker(actor, benchmark, jobs, split, envs_per_task, cameras, image_size, results, parent: int) -> None:
    """One evaluation process: runs its jobs, sends each outcome as it ends, then its whole result."""
    import threading

    import torch

    from lcbc.collect import exit_with_parent

    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(1)
    try:
        result = run_jobs(actor, benchmark, jobs, split, envs_per_task, cameras, image_size, progress=False,
                          finished=lambda outcome: results.put(("outcome", None)))
        results.put(("result", result))
    except Exception as error:  # reported to the parent, which raises it
        results.put(("error", error))


def _run_in_workers(actor, benchmark, jobs, split, envs_per_task, cameras, image_size, progress,
                    workers: int) -> EvalResult:
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, daemon=True, args=(actor, benchmark, share, split, envs_per_task,
                                                                    cameras, image_size, results, os.getpid()))
                 for share in shard(jobs, workers)]
    merged = EvalResult()
    try:
        for process in processes:
            process.start()
        with progress_bar(progress) as bar:
            progress_task = bar.add_task("eval", total=len(jobs))
            done = 0
            while done < len(processes):
                kind, payload = results.get()
                if kind == "outcome":
                    bar.advance(progress_task)
                elif kind == "error":
                    raise payload
                else:
                    done += 1
                    for key, values in payload.successes.items():
                        merged.successes.setdefault(key, []).extend(values)
                    merged.outcomes += payload.outcomes
                    merged.steps += payload.steps
                    merged.seconds = max(merged.seconds, payload.seconds)  # stepping time, as one process counts it
    finally:
        for process in processes:
            if process.pid is None:  # never started
                continue
            if process.is_alive():
                process.terminate()
            process.join()
    return merged


# Building an environment can be slow (a Meta-World one parses its MuJoCo model: ~0.3 s each, 100 for an
# MT10 evaluation); rollouts in one process (the policy's, then the expert's on the same goals) reuse
# them. Every episode resets onto its goal, so nothing carries over between rollouts.
_IDLE_ENVS: dict[tuple, list] = {}


def _borrow_env(benchmark, task: str, cameras: tuple[str, ...], image_size: int):
    idle = _IDLE_ENVS.get((benchmark.name, task, tuple(cameras), image_size))
    return idle.pop() if idle else benchmark.make_env(task, cameras=tuple(cameras), image_size=image_size)
