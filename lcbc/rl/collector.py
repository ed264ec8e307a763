"""Online experience for RL fine-tuning: many Meta-World envs stepped together, one batched policy call.

Every task gets `envs_per_task` environments. Each runs one episode after another, every one on a new
goal (`exploration_goal`: seed 0's, where the demonstrations came from, then seeds 2, 3, ...; never
seed 1's, which evaluation uses), and a finished episode
goes to the replay buffer as its simulator states and actions (the buffer recomputes observations and
rewards from them). An episode ends at the first success (as evaluation episodes do), or after
`max_episode_steps`, a time limit that is not terminal for the critics.

Exploration: the policy's decoded action plus Gaussian noise of `exploration_std`, clipped to the action
space. Sampling the policy's own bin distribution would barely explore: behavior cloning of
deterministic experts leaves it about one HL-Gauss label width wide, a hundredth of the action range.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from lcbc.envs.instructions import canonical_instruction
from lcbc.envs.metaworld import GOALS_PER_SEED, MetaWorldEnv, goal_for_episode
from lcbc.evaluation.rollout import EVAL_SEED, Job, PolicyActor

TRAIN_SEED = 0


def exploration_goal(task: str, number: int):
    """The goal of a task's `number`-th exploration episode. Cycling through the demonstrations' 50 goals
    would teach the policy those 50 goals only (cloning from 50 goals already generalizes poorly to new
    ones in reach, push and pick-place); fresh goals each episode make acting on new goals the training
    data. Evaluation's goals stay unseen."""
    if number < GOALS_PER_SEED:
        return goal_for_episode(task, TRAIN_SEED, number)
    return goal_for_episode(task, EVAL_SEED + 1, number - GOALS_PER_SEED)


@dataclass
class Episode:
    """One environment's episode in flight: its goal, the simulator states so far and the actions."""

    task: str
    number: int
    goal: object
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)


class Collector:
    """Runs exploration episodes for every task and writes the finished ones into a ReplayBuffer."""

    def __init__(self, tasks: list[str], envs_per_task: int = 1, max_episode_steps: int = 500,
                 exploration_std: float = 0.1, seed: int = 0, recent: int = 100):
        warnings.filterwarnings("ignore", message="Constant")
        self.tasks = list(tasks)
        self.envs = [MetaWorldEnv(task, seed=TRAIN_SEED) for task in tasks for _ in range(envs_per_task)]
        self.max_episode_steps = min(max_episode_steps, self.envs[0].max_episode_steps)
        self.exploration_std = exploration_std
        self.rng = np.random.default_rng(seed)
        self.episodes_started = dict.fromkeys(self.tasks, 0)  # per task: which training goal comes next
        self.recent_successes: deque[bool] = deque(maxlen=recent)
        self._episodes: list[Episode | None] = [None] * len(self.envs)
        self._observations: list[dict | None] = [None] * len(self.envs)

    def _start(self, i: int) -> None:
        env = self.envs[i]
        number = self.episodes_started[env.task]
        self.episodes_started[env.task] += 1
        goal = exploration_goal(env.task, number)
        env.set_goal(goal)
        self._observations[i], _ = env.reset()
        self._episodes[i] = Episode(env.task, number, goal, [env.simulator_state()])

    def step(self, actor: PolicyActor, replay) -> int:
        """One step of every environment with one batched policy call; finished episodes go to `replay`
        and their environments start the next goal. Returns the number of environment steps taken."""
        fresh = np.array([episode is None for episode in self._episodes])
        for i in np.flatnonzero(fresh):
            self._start(i)
        if fresh.any():
            actor.reset(fresh)
        batch = {key: np.stack([obs[key] for obs in self._observations]) for key in self._observations[0]}
        jobs = [Job(e.task, canonical_instruction(e.task), e.number) for e in self._episodes]
        actions = actor(batch, jobs)
        actions = actions + self.exploration_std * self.rng.standard_normal(actions.shape)
        actions = np.clip(actions, -1.0, 1.0)
        for i, (env, episode) in enumerate(zip(self.envs, self._episodes)):
            self._observations[i], _, terminated, truncated, info = env.step(actions[i])
            episode.states.append(env.simulator_state())
            episode.actions.append(actions[i])
            if info["success"] or terminated or truncated or len(episode.actions) >= self.max_episode_steps:
                replay.add_episode(episode.task, episode.goal, np.array(episode.states), np.array(episode.actions))
                self.recent_successes.append(bool(info["success"]))
                self._episodes[i] = None
        return len(self.envs)

    @property
    def success_rate(self) -> float:
        """Success over the most recently finished episodes (noisy actions, training goals)."""
        return float(np.mean(self.recent_successes)) if self.recent_successes else float("nan")

    def state_dict(self) -> dict:
        """What a resumed run needs to go on where this one stopped: which goal each task runs next and the
        noise generator. Episodes in flight are not kept; a resumed run starts new ones."""
        return {"episodes_started": dict(self.episodes_started), "rng": self.rng.bit_generator.state,
                "recent_successes": list(self.recent_successes)}

    def load_state_dict(self, state: dict) -> None:
        self.episodes_started.update(state["episodes_started"])
        self.rng.bit_generator.state = state["rng"]
        self.recent_successes.extend(state["recent_successes"])
        self._episodes = [None] * len(self.envs)
