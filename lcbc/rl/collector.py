"""Online experience for RL fine-tuning: many of a benchmark's envs stepped together, one batched policy call.

Every task starts with `envs_per_task` environments (slots). Each runs one episode after another (with
`task_collection: failures` a slot's next episode may be another task's), every one on a new goal
variation of the benchmark's train split (fresh goals each episode make acting on new goals the training
data; cycling through the demonstrations' few goals would teach those only), and a finished episode goes
to the replay buffer with its observations, successes and, where the environment gives them, simulator
states (a benchmark's scorer recomputes rewards from them). An episode ends at the first success (as
evaluation episodes do), or after `max_episode_steps`, a time limit that is not terminal for the critics.

Exploration: the policy's decoded action plus Gaussian noise of `exploration_std`, clipped to the action
space. Sampling the policy's own bin distribution would barely explore: behavior cloning of
deterministic experts leaves it about one HL-Gauss label width wide, a hundredth of the action range.
The noise is white (independent every step) or pink (power falling as 1/frequency, drawn for the whole
episode; Eberhard et al. 2023): where actions move the hand, white noise averages out within a few steps and
the hand ends where the policy would have taken it, while pink noise drifts it over an episode, which
spreads the positions that hindsight relabeling turns into goals. The noise's scale is
`exploration_std` in every episode (`fixed`), or drawn for each episode uniformly between 0 and
`exploration_std` (`uniform`), so that precise tasks also get quiet episodes.

Reset-free practice (`reset_free`): an environment whose task has a reverse in the benchmark (drawer-open and
drawer-close) is not reset when an episode ends. After a success it goes on as the reverse task from where
the robot and objects are (`env.switch_task`), after a failure as the same task, so each direction starts
where the other left off, as a robot without a person to reset its scene practises. Only a hard limit of
`reset_free_steps` environment steps on one goal variation resets it (`forced_resets` counts those), or a
stuck state: `reset_free_failures` failed episodes in a row (`stuck_resets`).
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from lcbc.evaluation.rollout import Job, PolicyActor
from lcbc.rl.replay import Episode as StoredEpisode

NOISE = ("white", "pink")
NOISE_SCALE = ("fixed", "uniform")
# Which task an environment runs next: always its own ("uniform": every task gets the same share of the
# environment steps), or one drawn in proportion to `solved_task_weight` plus the share of the task's recent
# episodes that failed ("failures": steps go where the policy still fails; solved tasks keep a share).
TASK_COLLECTION = ("uniform", "failures")


def pink_noise(rng: np.random.Generator, steps: int, dims: int) -> np.ndarray:
    """(steps, dims) Gaussian noise of unit variance whose power spectrum falls as 1/frequency: random
    Fourier coefficients scaled by frequency^-1/2, the lowest frequency (1/steps) also standing in for the
    constant term, so that an episode can drift in one direction throughout."""
    frequencies = np.fft.rfftfreq(steps)
    frequencies[0] = frequencies[1] if steps > 1 else 1.0
    shape = (dims, len(frequencies))
    coefficients = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(frequencies)
    noise = np.fft.irfft(coefficients, n=steps, axis=-1)
    return (noise / noise.std(axis=-1, keepdims=True).clip(1e-12)).T


@dataclass
class Episode:
    """One environment's episode in flight: its goal, the simulator states so far and the actions."""

    task: str
    number: int
    goal: object
    noise: np.ndarray  # (max_episode_steps, A) exploration noise in units of exploration_std, one row per step
    obs: list[np.ndarray] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    success: list[bool] = field(default_factory=list)

    def stored(self) -> StoredEpisode:
        return StoredEpisode(self.task, self.goal, np.array(self.obs), np.array(self.actions),
                             np.array(self.success), np.array(self.states) if self.states else None)


class Collector:
    """Runs exploration episodes for every task and writes the finished ones into a ReplayBuffer."""

    def __init__(self, benchmark, envs_per_task: int = 1, max_episode_steps: int = 500,
                 exploration_std: float = 0.1, exploration_noise: str = "white", exploration_scale: str = "fixed",
                 seed: int = 0, recent: int = 100, recent_per_task: int = 20, task_collection: str = "uniform",
                 solved_task_weight: float = 0.25, reset_free: bool = False, reset_free_steps: int = 2000,
                 reset_free_failures: int = 0):
        if exploration_noise not in NOISE:
            raise ValueError(f"exploration_noise: {exploration_noise!r} is not one of {', '.join(NOISE)}")
        if exploration_scale not in NOISE_SCALE:
            raise ValueError(f"exploration_scale: {exploration_scale!r} is not one of {', '.join(NOISE_SCALE)}")
        if task_collection not in TASK_COLLECTION:
            raise ValueError(f"task_collection: {task_collection!r} is not one of {', '.join(TASK_COLLECTION)}")
        warnings.filterwarnings("ignore", message="Constant")
        self.benchmark = benchmark
        self.tasks = list(benchmark.tasks)
        self.task_collection, self.solved_task_weight = task_collection, solved_task_weight
        # The environment each slot steps now; a slot that changes task parks its environment here for reuse.
        self.slot_tasks = [task for task in self.tasks for _ in range(envs_per_task)]
        self.envs = [benchmark.make_env(task) for task in self.slot_tasks]
        self._parked: dict[str, list] = {task: [] for task in self.tasks}
        self.max_episode_steps = min(max_episode_steps, self.envs[0].max_episode_steps)
        self.exploration_std = exploration_std
        self.exploration_noise, self.exploration_scale = exploration_noise, exploration_scale
        self.rng = np.random.default_rng(seed)
        self.episodes_started = dict.fromkeys(self.tasks, 0)  # per task: which training goal comes next
        self.recent_successes: deque[bool] = deque(maxlen=recent)
        self.task_successes = {task: deque(maxlen=recent_per_task) for task in self.tasks}
        self._episodes: list[Episode | None] = [None] * len(self.envs)
        self._observations: list[dict | None] = [None] * len(self.envs)
        self.reset_free, self.reset_free_steps = reset_free, reset_free_steps
        self.reset_free_failures = reset_free_failures
        self._failures_in_row = [0] * len(self.envs)
        # Reset-free: the task (and its episode number) a slot goes on as without a reset, else None.
        self._go_on_as: list[tuple[str, int] | None] = [None] * len(self.envs)
        self._scene_steps = [0] * len(self.envs)  # steps since the slot's environment was last reset
        self.forced_resets = 0  # reset-free environments reset by the hard limit
        self.stuck_resets = 0  # and by `reset_free_failures` failures in a row

    def _next_task(self, current: str) -> str:
        if self.task_collection == "uniform":
            return current
        weights = self.task_weights()
        return self.tasks[self.rng.choice(len(self.tasks), p=weights / weights.sum())]

    def _env_for(self, i: int, task: str):
        """Slot i's environment for `task`: its own, a parked one, or a new one."""
        if self.slot_tasks[i] != task:
            self._parked[self.slot_tasks[i]].append(self.envs[i])
            parked = self._parked[task]
            self.envs[i] = parked.pop() if parked else self.benchmark.make_env(task)
            self.slot_tasks[i] = task
        return self.envs[i]

    def _start(self, i: int) -> None:
        """Slot i's next episode: on a new training goal, or reset-free from where its last one ended."""
        if self._go_on_as[i] is not None:
            env, (task, number) = self.envs[i], self._go_on_as[i]
            self._observations[i] = env.switch_task(task)
            goal = env.goal
        else:
            task = self._next_task(self.slot_tasks[i])
            env = self._env_for(i, task)
            number = self.episodes_started[task]
            self.episodes_started[task] += 1
            goal = self.benchmark.goal(task, "train", number)
            self._observations[i], _ = env.reset(options={"goal": goal})
            self._scene_steps[i] = 0
        shape = (self.max_episode_steps, self.envs[i].action_space.shape[0])
        noise = (pink_noise(self.rng, *shape) if self.exploration_noise == "pink"
                 else self.rng.standard_normal(shape))
        if self.exploration_scale == "uniform":
            noise *= self.rng.uniform()
        states = [env.simulator_state()] if hasattr(env, "simulator_state") else []
        self._episodes[i] = Episode(task, number, goal, noise, [self._observations[i]["state"]], states)

    def step(self, actor: PolicyActor, replay) -> int:
        """One step of every environment with one batched policy call; finished episodes go to `replay`
        and their environments start the next goal. Returns the number of environment steps taken."""
        fresh = np.array([episode is None for episode in self._episodes])
        for i in np.flatnonzero(fresh):
            self._start(i)
        if fresh.any():
            actor.reset(fresh)
        batch = {key: np.stack([obs[key] for obs in self._observations]) for key in self._observations[0]}
        jobs = [Job(e.task, self.benchmark.canonical_instruction(e.task), e.number) for e in self._episodes]
        actions = actor(batch, jobs)
        noise = np.stack([episode.noise[len(episode.actions)] for episode in self._episodes])
        space = self.envs[0].action_space
        actions = np.clip(actions + self.exploration_std * noise, space.low, space.high)
        for i, (env, episode) in enumerate(zip(self.envs, self._episodes)):
            self._observations[i], _, terminated, truncated, info = env.step(actions[i])
            if episode.states:
                episode.states.append(env.simulator_state())
            episode.obs.append(self._observations[i]["state"])
            episode.actions.append(actions[i])
            episode.success.append(bool(info["success"]))
            self._scene_steps[i] += 1
            if info["success"] or terminated or truncated or len(episode.actions) >= self.max_episode_steps:
                replay.add_episode(episode.stored())
                self.recent_successes.append(bool(info["success"]))
                self.task_successes[episode.task].append(bool(info["success"]))
                self._episodes[i] = None
                self._go_on_as[i] = self._reset_free_next(i, episode, bool(info["success"]))
        return len(self.envs)

    def _reset_free_next(self, i: int, episode: Episode, success: bool) -> tuple[str, int] | None:
        """Under `reset_free`, what slot i goes on as without a reset: the reverse task after a success, the
        same task after a failure; None (a reset) for tasks without a reverse, at the hard limit and when stuck."""
        reverse = self.benchmark.reverse(episode.task)
        if not self.reset_free or reverse not in self.tasks:
            return None
        self._failures_in_row[i] = 0 if success else self._failures_in_row[i] + 1
        if self._scene_steps[i] >= self.reset_free_steps:
            self.forced_resets += 1
            self._failures_in_row[i] = 0  # a fresh goal variation starts its own count
            return None
        if self.reset_free_failures and self._failures_in_row[i] >= self.reset_free_failures:
            self.stuck_resets += 1
            self._failures_in_row[i] = 0
            return None
        return (reverse if success else episode.task), episode.number

    @property
    def success_rate(self) -> float:
        """Success over the most recently finished episodes (noisy actions, training goals)."""
        return float(np.mean(self.recent_successes)) if self.recent_successes else float("nan")

    def failure_rates(self) -> np.ndarray:
        """Per task, the share of its recent episodes that failed; 1.0 for a task with none finished yet."""
        return np.array([1.0 - np.mean(self.task_successes[task]) if self.task_successes[task] else 1.0
                         for task in self.tasks])

    def task_weights(self) -> np.ndarray:
        """Per task, `solved_task_weight` plus its failure rate: how strongly collection (`task_collection:
        failures`) and the training batches (`task_sampling: failures`) lean toward it."""
        return self.solved_task_weight + self.failure_rates()

    def state_dict(self) -> dict:
        """What a resumed run needs to go on where this one stopped: which goal each task runs next and the
        noise generator. Episodes in flight are not kept; a resumed run starts new ones."""
        return {"episodes_started": dict(self.episodes_started), "rng": self.rng.bit_generator.state,
                "forced_resets": self.forced_resets, "stuck_resets": self.stuck_resets,
                "recent_successes": list(self.recent_successes),
                "task_successes": {task: list(outcomes) for task, outcomes in self.task_successes.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.episodes_started.update(state["episodes_started"])
        self.forced_resets, self.stuck_resets = state.get("forced_resets", 0), state.get("stuck_resets", 0)
        self.rng.bit_generator.state = state["rng"]
        self.recent_successes.extend(state["recent_successes"])
        for task, outcomes in state["task_successes"].items():
            self.task_successes[task].extend(outcomes)
        self._episodes = [None] * len(self.envs)
        self._go_on_as = [None] * len(self.envs)
