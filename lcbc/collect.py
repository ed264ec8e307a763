"""Collect demonstrations from a benchmark's scripted experts into an HDF5 demonstration file.

Workers roll out the expert, one goal variation of the benchmark's train split per episode, and send
each successful episode to the parent, which is the only writer and flushes after every demo: a killed
collection keeps every episode finished before the kill, and `resume=True` picks up where it stopped.
Each demo records its `task`, `split` and `episode` (which goal variation it ran on), its simulator
`states` where the environment gives them, and sparse rewards (1 at the steps where the task holds),
as robomimic writes them.

`action_noise` perturbs the actions the environment executes, not the labels stored (DART, Laskey et al.
2017): the demos then visit states a little off the expert's own path, each labelled with the expert's
correction, which a cloned policy needs once its own small errors take it there.

`after_tasks` makes demos of a request made mid-episode, as chained requests (`lcbc eval --chain`) make
them: each episode first runs a random chain of 1 to `after_tasks` other tasks of the scene that the
demo's task can follow (Benchmark.can_follow), done by their experts and not recorded, and the demo starts
where the last one reached its goal, the scene changed by them. A policy cloned from fresh resets alone has
never seen such a start. Each demo's `after` attribute names the tasks done before it.

`driver` (a cloned policy's folder) makes the policy act while the expert only labels (DAgger, Ross et al.
2011): the demos show the states the policy itself reaches, its own mistakes included, each labelled with
what the expert would do there. Every episode is kept, the failed ones most of all; the tasks done first
(`after_tasks`) are the policy's too, asked for by their canonical instruction, and one it fails ends the
attempt unrecorded. Episode i runs on train placement i, so a driver given the placements its own demos
came from mostly succeeds; `first_placement` moves the collection to placements it has not seen.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lcbc.benchmark import load_benchmark
from lcbc.data.hdf5 import DemoWriter
from lcbc.errors import UserError
from lcbc.evaluation.rollout import holding
from lcbc.evaluation.scene import random_chain

# Demos go on this many steps past the first success. Success radii let a demo cut at the first success
# stop short of the goal (Meta-World counts a reach within 5 cm); with these steps the demos show finishing
# and holding still, and a policy cloned from them reaches unseen goals far more often (docs/RESULTS.md).
STEPS_AFTER_SUCCESS = 20


@dataclass
class CollectionReport:
    attempts: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)


def _noisy(env, action: np.ndarray, action_noise: float, rng: np.random.Generator) -> np.ndarray:
    if not action_noise:
        return action
    return np.clip(action + rng.normal(0.0, action_noise, action.shape), env.action_space.low, env.action_space.high)


def run_until_reached(env, actor, task: str, obs: dict, action_noise: float, rng: np.random.Generator) -> dict | None:
    """Step `actor` (an expert or a driving policy; actions noised as in the demos) until `task`'s goal holds;
    the observation then, or None when the episode ends first. The goal is read from info["scene_success"]
    (see Benchmark)."""
    for _ in range(env.max_episode_steps):
        action = np.clip(actor(obs), env.action_space.low, env.action_space.high)
        obs, _, terminated, truncated, info = env.step(_noisy(env, action, action_noise, rng))
        if holding(info, task).get(task):
            return obs
        if terminated or truncated:
            return None
    return None


def rollout_expert(env, expert, goal, steps_after_success: int = STEPS_AFTER_SUCCESS, action_noise: float = 0.0,
                   rng: np.random.Generator | None = None, after: list[tuple[str, Callable]] = (),
                   driver: Callable | None = None) -> tuple[dict, bool]:
    """One expert episode on `goal`; stops `steps_after_success` steps after the first success (so the demo
    also shows what the expert does once the task is done: hold, not wander off), when the environment ends
    it, or at its `max_episode_steps`. Action labels are clipped to the action space; the environment
    executes them with Gaussian noise of std `action_noise` (drawn from `rng`) added. `after`: (task, expert)
    pairs done first, unrecorded, each until its goal holds; the demo then starts with a fresh step limit
    (`env.restart_step_limit()`), and a failed one ends the attempt. `driver` (observation -> action), when
    given, is what acts in the demo; the expert's actions are still the labels stored."""
    low, high = env.action_space.low, env.action_space.high
    rng = rng or np.random.default_rng()
    obs, _ = env.reset(options={"goal": goal})
    for task, first in after:
        obs = run_until_reached(env, first, task, obs, action_noise, rng)
        if obs is None:
            return {}, False
        env.restart_step_limit()
    with_states = hasattr(env, "simulator_state")
    steps: dict[str, list] = {"actions": [], "rewards": [], "states": [], **{f"obs/{k}": [] for k in obs}}
    success, remaining = False, steps_after_success
    while len(steps["actions"]) < env.max_episode_steps:
        action = np.clip(expert(obs), low, high)
        executed = action if driver is None else np.clip(driver(obs), low, high)
        if with_states:
            steps["states"].append(env.simulator_state())
        for key, value in obs.items():
            steps[f"obs/{key}"].append(value)
        steps["actions"].append(action)
        obs, _, terminated, truncated, info = env.step(_noisy(env, executed, action_noise, rng))
        steps["rewards"].append(float(info["success"]))
        success = success or bool(info["success"])
        if success:
            if remaining == 0:
                break
            remaining -= 1
        if terminated or truncated:
            break
    arrays = {key: np.asarray(values) for key, values in steps.items() if values}
    for key, values in arrays.items():
        if values.dtype != np.uint8:
            arrays[key] = values.astype(np.float32)
    dones = np.zeros(len(arrays["actions"]), dtype=np.int64)
    dones[-1] = 1
    arrays["dones"] = dones
    return arrays, success


def predecessors(benchmark, task: str) -> list[str]:
    """The scene's tasks that `task` can follow."""
    return [other for other in benchmark.scene(task) if benchmark.can_follow(other, task)]


class PolicyDriver:
    """The cloned policy at `path` as what acts in a collection with a `driver`, in one environment:
    `reset()` as an episode starts, `acting(task)` asks for `task` (its canonical instruction) from there on.
    Requests of one episode share its memory, as in a chained evaluation."""

    def __init__(self, path: str, benchmark):
        import torch

        from lcbc.evaluation.rollout import PolicyActor
        from lcbc.policies.language_policy import LanguagePolicy

        torch.set_num_threads(1)  # one environment a step: one thread is fastest
        self.actor, self.benchmark = PolicyActor(LanguagePolicy.from_pretrained(path)), benchmark

    def reset(self) -> None:
        self.actor.reset(np.ones(1, dtype=bool))

    def acting(self, task: str) -> Callable[[dict], np.ndarray]:
        from lcbc.evaluation.rollout import Job

        job = Job(task, self.benchmark.canonical_instruction(task), 0)
        return lambda obs: self.actor({key: np.asarray(value)[None] for key, value in obs.items()}, [job])[0]


def collect_task(benchmark_spec: str, task: str, episodes: int, cameras: tuple[str, ...], image_size: int,
                 steps_after_success: int, action_noise: float, after_tasks: int, driver: str | None,
                 first_placement: int, done_episodes: frozenset[int], emit: Callable) -> None:
    """Roll out the expert (or the `driver` policy, the expert labelling) on new training goals of `task`
    until `episodes` are kept: the successful ones, or every one with a driver. Emit each kept one."""
    warnings.filterwarnings("ignore", message="Constant")
    try:
        benchmark = load_benchmark(benchmark_spec)
        experts = {name: benchmark.expert(name) for name in (task, *predecessors(benchmark, task))}
        policy = PolicyDriver(driver, benchmark) if driver else None
        env = benchmark.make_env(task, cameras=cameras, image_size=image_size)
        kept, attempts, episode = len(done_episodes), 0, first_placement
        max_episode = first_placement + 3 * episodes + 20
        while kept < episodes and episode < max_episode:
            if episode not in done_episodes:
                # The noise (and the tasks done first) are the episode's own: a resumed collection redoes an
                # episode identically.
                rng = np.random.default_rng([zlib.crc32(task.encode()), episode, *([after_tasks] * bool(after_tasks))])
                before = first_tasks(benchmark, task, after_tasks, rng)
                if policy:
                    policy.reset()
                arrays, success = rollout_expert(env, experts[task], benchmark.goal(task, "train", episode),
                                                 steps_after_success, action_noise, rng,
                                                 after=[(name, policy.acting(name) if policy else experts[name])
                                                        for name in before],
                                                 driver=policy.acting(task) if policy else None)
                attempts += 1
                if success or (policy and arrays):
                    kept += 1
                    emit(("episode", task, episode, arrays, before))
            episode += 1
        env.close()
        emit(("done", task, attempts, kept))
    except Exception:  # reported to the parent, which stops the whole collection
        emit(("error", task, traceback.format_exc()))


def first_tasks(benchmark, task: str, after_tasks: int, rng: np.random.Generator) -> list[str]:
    """A random chain of 1 to `after_tasks` tasks that `task` can follow (none when `after_tasks` is 0)."""
    if not after_tasks:
        return []
    length = int(rng.integers(1, after_tasks + 1))
    # Shorter when the scene has no chain that long; collect() has checked that one task can come first.
    chains = (random_chain(benchmark, predecessors(benchmark, task), n, rng) for n in range(length, 0, -1))
    return next(chain for chain in chains if chain)


def exit_with_parent(parent: int) -> None:
    """Ends this process within half a second of its parent's end (killed, say): no orphan keeps collecting,
    holding the queues, their semaphores or the resource tracker."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker(jobs, results, parent: int) -> None:
    """A worker process: collects the tasks it takes from `jobs` until it gets None."""
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    for job in iter(jobs.get, None):
        collect_task(*job, emit=results.put)


def check_driver(path: str, benchmark, tasks: list[str], cameras: tuple[str, ...]) -> None:
    """A driving policy loads, can be asked for each task, and sees what the collection renders."""
    from lcbc.policies.language_policy import LanguagePolicy

    config = LanguagePolicy.from_pretrained(path).config
    if config["task_mode"] == "goal":
        raise UserError(f"--driver {path}: a goal-conditioned policy cannot be asked for a task")
    unknown = [task for task in tasks if config["task_mode"] == "onehot" and task not in config["tasks"]]
    if unknown:
        raise UserError(f"--driver {path}: the policy was not trained on {unknown[0]}")
    unseen = [key for key in config["image_keys"] if key.removesuffix("_rgb") not in cameras]
    if unseen:
        raise UserError(f"--driver {path}: the policy reads {unseen[0]}; record it with --obs both --camera")


def collect(out: str, benchmark_spec: str, episodes_per_task: int, cameras: tuple[str, ...] = (),
            image_size: int = 64, workers: int = 1, mode: str = "create",
            steps_after_success: int = STEPS_AFTER_SUCCESS, tasks: list[str] | None = None,
            action_noise: float = 0.0, after_tasks: int = 0, driver: str | None = None,
            first_placement: int = 0) -> CollectionReport:
    """Collect `episodes_per_task` successful expert demos of each of the benchmark's tasks (or `tasks`) into
    `out`, each after a chain of up to `after_tasks` other tasks; with `driver`, a policy folder, that many
    episodes in which the policy acts and the expert labels (see the module docstring). Episodes run on train
    placements `first_placement`, `first_placement` + 1, ..."""
    benchmark = load_benchmark(benchmark_spec)
    tasks = list(tasks or benchmark.tasks)
    needed = set(tasks) | {other for task in tasks for other in predecessors(benchmark, task)} if after_tasks else tasks
    missing = [task for task in needed if benchmark.expert(task) is None]
    if missing:
        raise UserError(f"--benchmark {benchmark_spec}: no scripted expert for {missing[0]}")
    alone = [task for task in tasks if after_tasks and not predecessors(benchmark, task)]
    if alone:
        raise UserError(f"--after-tasks: no task of {benchmark.name} can come before {alone[0]} in one episode "
                        f"(Benchmark.can_follow)")
    if driver:
        check_driver(driver, benchmark, tasks, cameras)
    env_args = {"env_name": benchmark.name, "env_type": "lcbc",
                "env_kwargs": {"benchmark": benchmark_spec, "tasks": tasks, "image_size": image_size,
                               "steps_after_success": steps_after_success,
                               **({"cameras": list(cameras)} if cameras else {}),  # absent: state only
                               **({"action_noise": action_noise} if action_noise else {}),  # absent: none
                               **({"after_tasks": after_tasks} if after_tasks else {}),
                               **({"driver": str(driver)} if driver else {}),
                               **({"first_placement": first_placement} if first_placement else {})}}
    report = CollectionReport()
    # A resumed file must hold the same observations, so the same cameras and image size, and the same noise,
    # starts, driver and placements.
    with DemoWriter(out, env_args, mode=mode, same_setup=("cameras", "image_size", "action_noise", "after_tasks",
                                                          "driver", "first_placement")) as writer:
        done: dict[str, set[int]] = {task: set() for task in tasks}
        for attrs in writer.existing_demo_attrs():
            if attrs.get("task") in done and attrs.get("split") == "train":
                done[attrs["task"]].add(int(attrs["episode"]))
        jobs = [(benchmark_spec, task, episodes_per_task, tuple(cameras), image_size, steps_after_success, action_noise,
                 after_tasks, driver and str(driver), first_placement, frozenset(done[task])) for task in tasks]
        total = episodes_per_task * len(tasks)
        columns = (TextColumn("collect"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns) as progress:
            bar = progress.add_task("collect", total=total,
                                    completed=sum(min(len(d), episodes_per_task) for d in done.values()))

            def handle(message) -> None:
                if message[0] == "episode":
                    _, task, episode, arrays, before = message
                    obs = {key[4:]: value for key, value in arrays.items() if key.startswith("obs/")}
                    writer.add_demo(arrays["actions"], obs, arrays["rewards"], arrays["dones"],
                                    states=arrays.get("states"), task=task, split="train", episode=episode,
                                    instruction=benchmark.canonical_instruction(task),
                                    **({"after": ",".join(before)} if before else {}))
                    progress.advance(bar)
                elif message[0] == "done":
                    _, task, attempts, kept = message
                    report.attempts[task], report.kept[task] = attempts, kept
                else:
                    raise RuntimeError(f"collecting {message[1]} failed:\n{message[2]}")

            if workers <= 1:
                for job in jobs:
                    collect_task(*job, emit=handle)
            else:
                context = mp.get_context("spawn")
                job_queue, results = context.Queue(), context.Queue()
                for job in jobs + [None] * workers:
                    job_queue.put(job)
                processes = [context.Process(target=_worker, args=(job_queue, results, os.getpid()), daemon=True)
                             for _ in range(min(workers, len(jobs)))]
                for process in processes:
                    process.start()
                try:
                    while len(report.kept) < len(tasks):
                        handle(results.get())
                finally:
                    for process in processes:
                        if process.is_alive() and len(report.kept) < len(tasks):
                            process.terminate()
                        process.join()
    return report
