"""The multi-task replay buffer for RL fine-tuning, with reward, goal and task relabeling.

The tasks form one MDP: each transition carries its task index, and its state (the environment's flat
`state` observation) carries the goal where the benchmark's goal interface writes it. Demonstrations
live in their own part, which the online ring never overwrites, and a batch mixes the two parts in a
fixed proportion.

Relabeling happens when an episode is added, so sampling stays an index gather. The relabeled
transitions are stored beside the original ones, tagged with the task and goal they were relabeled to,
zero rewards included: the critic learns from them what does not reach a goal.

Who computes observations, rewards and successes is the benchmark's business. A benchmark with a scorer
(Meta-World's, for one) recomputes them from stored simulator states, for the
episode's own task, other goals (hindsight) and the other tasks of its scene (task relabels). Without
one, episodes are stored as observed, with goal relabels through the benchmark's goal interface
(`achieved_goal`, `with_goal`, `goal_reached`) and no task relabels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcbc.data.hdf5 import demo_instruction, open_demo_file, validate
from lcbc.errors import UserError

REWARDS = ("sparse", "dense")
GOAL_STRATEGIES = ("none", "future", "final", "episode")
TASK_STRATEGIES = ("none", "all", "random", "high")

ONLINE, DEMO = 0, 1  # the `source` column
ORIGINAL, GOAL_RELABEL, TASK_RELABEL = 0, 1, 2  # the `relabel` column
SOURCES = {"online": ONLINE, "demo": DEMO}


@dataclass(frozen=True)
class RelabelConfig:
    """How rewards are defined and which relabeled transitions an episode adds.

    goal_strategy picks, for each transition of a task with a free goal (the benchmark's `goal_tasks`),
    `goal_relabels` steps of the same episode whose achieved goal becomes the new goal: 'future' a step
    at or after it, 'episode' any step, 'final' the last step (one relabel: more copies would be identical).
    task_strategy picks other tasks of the same scene (the benchmark's `scene`) to score the whole episode
    with: 'all', 'random' (`task_relabels` of them), 'high' (the `task_relabels` best whose return reaches
    `high_return`, in units of the reward: with sparse rewards 1.0 means at least one successful step;
    the steps of a success the episode starts with do not count, see `newly_reached`)."""

    reward: str = "sparse"
    goal_strategy: str = "none"
    goal_relabels: int = 4
    task_strategy: str = "none"
    task_relabels: int = 1
    high_return: float = 1.0

    def __post_init__(self):
        for name, allowed in (("reward", REWARDS), ("goal_strategy", GOAL_STRATEGIES),
                              ("task_strategy", TASK_STRATEGIES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"RelabelConfig.{name}: {value!r} is not one of {', '.join(allowed)}")
        for name in ("goal_relabels", "task_relabels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RelabelConfig.{name}: {value!r} is not a positive integer")


@dataclass
class Episode:
    """One finished episode as the collector saw it."""

    task: str
    goal: object  # the goal variation it ran on (the benchmark's `goal`), None when unknown
    obs: np.ndarray  # (T+1, D) the flat `state` observation after reset and after each step
    actions: np.ndarray  # (T, A) the actions the env received
    success: np.ndarray  # (T,) info["success"] after each step
    states: np.ndarray | None = None  # (T+1, S) simulator states, when the environment gives them


@dataclass
class Scores:
    """One episode as one task sees it: T steps, T+1 states, k goals per step."""

    obs: np.ndarray  # (T+1, D) the observation at each state, with the task's own goal
    reward: np.ndarray  # (T, k) the benchmark's dense reward of each step in [0, 1], for each goal
    success: np.ndarray  # (T, k)
    achieved: np.ndarray | None  # (T+1, G) the achieved goal at each state, for goal tasks
    target: np.ndarray  # (G,) the task's own goal


class ObservedScorer:
    """The scorer of a benchmark that cannot score stored states: the episode as observed, and other goals
    through the benchmark's goal interface. Its dense reward is the success."""

    def __init__(self, benchmark, tasks: list[str]):
        self.benchmark = benchmark
        env = benchmark.make_env(tasks[0])
        if "state" not in env.observation_space.spaces:
            raise UserError(f"{benchmark.name}: fine-tuning needs a flat 'state' observation")
        self.obs_dim = env.observation_space["state"].shape[0]
        self.action_dim = env.action_space.shape[0]
        env.close()

    def state_size(self, task: str) -> int:
        return 0

    def score(self, task: str, goal, episode: Episode, goals: np.ndarray | None = None) -> Scores:
        benchmark, obs = self.benchmark, np.asarray(episode.obs, dtype=np.float64)
        achieved = benchmark.achieved_goal(task, obs) if task in benchmark.goal_tasks else None
        if goals is None:
            success = np.asarray(episode.success, dtype=bool)[:, None]
        else:
            success = benchmark.goal_reached(task, achieved[1:, None], goals)
        return Scores(obs, success.astype(np.float64), success, achieved, np.zeros(benchmark.goal_dim))


def reaches_goal(success: np.ndarray) -> np.ndarray:
    """(T,) success after each step -> (T,) whether the episode succeeds at that step or a later one: the
    transitions worth imitating when only successes are (FineTuning's `imitate: successful`)."""
    return np.logical_or.accumulate(success[::-1])[::-1]


def discounted_return(reward: np.ndarray, terminal: np.ndarray, gamma: float) -> np.ndarray:
    """(T,) rewards and terminals of one episode -> (T,) the discounted sum of rewards from each step up to
    its next terminal step or the episode's end. Rewards are never negative, so what the episode went on
    to collect is a lower bound on what its action at that step is worth (FineTuning's `return_bound`)."""
    returns, following = np.zeros(len(reward)), 0.0
    for t in range(len(reward) - 1, -1, -1):
        following = reward[t] + (0.0 if terminal[t] else gamma * following)
        returns[t] = following
    return returns


def held_from_start(success: np.ndarray) -> np.ndarray:
    """(T,) success after each step -> (T,) whether the task has held since the first step."""
    return np.logical_and.accumulate(success)


def newly_reached(success: np.ndarray) -> np.ndarray:
    """(T,) success after each step, less the successes the episode starts with: a task that already holds
    in the first state (drawer-close scored on a drawer-open episode, whose drawer starts closed) asks
    nothing of the actions, so they are not imitated for it, as goals where the object already stood."""
    return success & ~held_from_start(success)


class ReplayBuffer:
    """Transitions of all tasks: a ring of `capacity` online transitions and a demo part it never overwrites.

    Columns: obs, next_obs (float32 states), action, reward, terminal (success for the transition's
    task and goal: every step from the first success on, including a demo's steps past it; a time limit
    is never terminal), task (index into `tasks`), goal (the goal the reward was computed with, float64),
    sim_state (after the step, padded with zeros to the largest task's size; empty without a scorer),
    episode, step, source (ONLINE, DEMO), relabel (ORIGINAL, GOAL_RELABEL, TASK_RELABEL), reaches_goal
    (see `reaches_goal`) and return (see `discounted_return`, with discount `gamma`).
    """

    def __init__(self, benchmark, capacity: int, relabel: RelabelConfig | None = None,
                 demo_fraction: float = 0.25, seed: int = 0, gamma: float = 0.99):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReplayBuffer.capacity: {capacity!r} is not a positive integer")
        if not 0.0 <= demo_fraction <= 1.0:
            raise ValueError(f"ReplayBuffer.demo_fraction: {demo_fraction!r} is not between 0 and 1")
        self.benchmark = benchmark
        self.tasks = list(benchmark.tasks)
        self.capacity = capacity
        self.config = relabel or RelabelConfig()
        self.demo_fraction = demo_fraction
        self.gamma = gamma
        self.rng = np.random.default_rng(seed)
        self.scorer = benchmark.scorer(self.tasks) or ObservedScorer(benchmark, self.tasks)
        if self.config.reward == "dense" and isinstance(self.scorer, ObservedScorer):
            raise UserError(f"reward: dense needs a benchmark that scores states; {benchmark.name} has no scorer")
        sim_dim = max(self.scorer.state_size(task) for task in self.tasks)
        obs_dim, action_dim = self.scorer.obs_dim, self.scorer.action_dim
        self.columns = {
            "obs": ((obs_dim,), np.float32), "next_obs": ((obs_dim,), np.float32),
            "action": ((action_dim,), np.float32), "reward": ((), np.float32), "terminal": ((), bool),
            "task": ((), np.int64), "goal": ((benchmark.goal_dim,), np.float64),
            "sim_state": ((sim_dim,), np.float64), "episode": ((), np.int64), "step": ((), np.int32),
            "source": ((), np.uint8), "relabel": ((), np.uint8), "reaches_goal": ((), bool),
            "return": ((), np.float32),
        }
        self._online = {key: np.zeros((capacity, *shape), dtype) for key, (shape, dtype) in self.columns.items()}
        self._demos = {key: np.zeros((0, *shape), dtype) for key, (shape, dtype) in self.columns.items()}
        self._next = 0
        self.online_size = 0
        self._episodes = 0

    @property
    def demo_size(self) -> int:
        return len(self._demos["action"])

    def __len__(self) -> int:
        return self.online_size + self.demo_size

    def transitions(self, source: str = "online") -> dict[str, np.ndarray]:
        """The stored rows of one part (views; the ring's rows are not in insertion order once it wraps)."""
        if source not in SOURCES:
            raise ValueError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
        if source == "demo":
            return self._demos
        return {key: column[:self.online_size] for key, column in self._online.items()}

    # ---- adding -------------------------------------------------------------------------------

    def add_episode(self, episode: Episode, source: str = "online") -> int:
        """Store an episode and its relabels; returns its episode id."""
        if source not in SOURCES:
            raise ValueError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
        rows = self._episode_rows(episode, SOURCES[source])
        if source == "demo":
            self._append_demos(rows)
        else:
            self._write_online(rows)
        return int(rows["episode"][0])

    def load_demos(self, path) -> int:
        """Add every demo of an HDF5 file to the demo part; returns the transitions added (relabels
        included). A demo needs its `obs/state`; with a scorer also its simulator `states` and the `task`,
        `split` and `episode` attributes lcbc's collection writes (they name its goal variation), and its
        rewards are recomputed. Without a scorer a demo counts as successful from its `rewards` (sparse,
        as lcbc and robomimic write them) and its last observation after the last step is `next_obs/state`
        (or, without one, the last `obs/state` again)."""
        with open_demo_file(path) as file:
            parts = [self._episode_rows(self._demo_episode(file, name, path), DEMO)
                     for name in validate(file, path)]
        rows = _concatenate(parts)
        self._append_demos(rows)
        return len(rows["action"])

    def _demo_episode(self, file, name: str, path) -> Episode:
        group = file["data"][name]
        task = self._demo_task(file, name, path)
        if "state" not in group["obs"]:
            raise UserError(f"{path}: {name}: no 'obs/state' dataset (fine-tuning stores flat states)")
        actions = group["actions"][()].astype(np.float64)
        obs = group["obs/state"][()].astype(np.float64)
        last = group["next_obs/state"][-1] if "next_obs/state" in group else obs[-1]
        rewards = group["rewards"][()] if "rewards" in group else np.zeros(len(actions))
        episode = Episode(task, None, np.vstack([obs, last]), actions, np.asarray(rewards) > 0.5)
        if isinstance(self.scorer, ObservedScorer):
            return episode
        if "states" not in group:
            raise UserError(f"{path}: {name}: no 'states' dataset (rewards are recomputed from simulator states)")
        for key in ("split", "episode"):
            if key not in group.attrs:
                raise UserError(f"{path}: {name}: no '{key}' attribute (it names the goal variation the demo ran "
                                "with; collect the file again with lcbc collect)")
        split = group.attrs["split"]
        episode.goal = self.benchmark.goal(task, split.decode() if isinstance(split, bytes) else str(split),
                                           int(group.attrs["episode"]))
        states = group["states"][()].astype(np.float64)
        size = self.scorer.state_size(task)
        if states.ndim != 2 or states.shape[1] != size or actions.shape[1] != self.scorer.action_dim:
            raise UserError(f"{path}: {name}: states has shape {states.shape} and actions {actions.shape}; "
                            f"{task} needs (T, {size}) simulator states and (T, {self.scorer.action_dim}) actions")
        episode.states = np.vstack([states, self.scorer.final_state(task, episode.goal, states, actions)])
        return episode

    def _demo_task(self, file, name: str, path) -> str:
        """The demo's `task` attribute (lcbc writes it), else the task its instruction belongs to."""
        value = file["data"][name].attrs.get("task")
        if value is not None:
            task = value.decode() if isinstance(value, bytes) else str(value)
        else:
            text = demo_instruction(file, name, path)
            task = next((task for task in self.tasks if text in self.benchmark.instructions(task)), None)
            if task is None:
                raise UserError(f"{path}: {name}: no 'task' attribute, and instruction {text!r} is none of "
                                f"{self.benchmark.name}'s")
        if task not in self.tasks:
            raise UserError(f"{path}: {name}: task {task!r} is not one of this buffer's tasks "
                            f"({', '.join(self.tasks)})")
        return task

    def _episode_rows(self, episode: Episode, source: int) -> dict[str, np.ndarray]:
        """The episode's transitions, then its goal relabels, then its task relabels."""
        task, benchmark = episode.task, self.benchmark
        if task not in self.tasks:
            raise ValueError(f"task: {task!r} is not one of this buffer's tasks ({', '.join(self.tasks)})")
        actions = episode.actions = np.asarray(episode.actions, dtype=np.float64)
        size = self.scorer.state_size(task)
        if episode.states is not None:
            episode.states = np.asarray(episode.states, dtype=np.float64)
        states_ok = size == 0 or (episode.states is not None and episode.states.shape == (len(actions) + 1, size))
        if (actions.ndim != 2 or actions.shape[1] != self.scorer.action_dim or len(actions) < 1
                or np.shape(episode.obs)[0] != len(actions) + 1 or not states_ok):
            raise ValueError(f"episode of {task}: obs has shape {np.shape(episode.obs)}, actions {actions.shape}, "
                             f"states {None if episode.states is None else episode.states.shape}; expected "
                             f"T+1, (T, {self.scorer.action_dim}) and (T+1, {size}) with T >= 1")
        number = self._episodes
        self._episodes += 1
        padded = np.zeros((len(actions), self.columns["sim_state"][0][0]))
        if size:
            padded[:, :size] = episode.states[1:]

        def rows(task_name, obs, next_obs, goal, scores: Scores, goal_index: int, kind: int,
                 reaches: np.ndarray) -> dict[str, np.ndarray]:
            steps = len(actions)
            reward, terminal = self._reward(scores)[:, goal_index], scores.success[:, goal_index]
            return {"obs": obs, "next_obs": next_obs, "action": actions, "reaches_goal": reaches,
                    "reward": reward, "terminal": terminal, "return": discounted_return(reward, terminal, self.gamma),
                    "task": np.full(steps, self.tasks.index(task_name)),
                    "goal": np.broadcast_to(goal, (steps, benchmark.goal_dim)), "sim_state": padded,
                    "episode": np.full(steps, number), "step": np.arange(steps), "source": np.full(steps, source),
                    "relabel": np.full(steps, kind)}

        own = self.scorer.score(task, episode.goal, episode)
        parts = [rows(task, own.obs[:-1], own.obs[1:], own.target, own, 0, ORIGINAL, reaches_goal(own.success[:, 0]))]
        if self.config.goal_strategy != "none" and task in benchmark.goal_tasks:
            goal_steps = self._goal_steps(len(actions))
            goals = own.achieved[goal_steps + 1]  # achieved[t + 1]: after step t
            if self.config.reward == "sparse":
                # A sparse reward is the success, which for a goal task is the distance the goal interface
                # measures (Meta-World's evaluate_state measures the same): no replay of the episode in the
                # simulator for every goal, which took a fifth of a fine-tuning run's time.
                success = benchmark.goal_reached(task, own.achieved[1:, None], goals)
                relabeled = Scores(own.obs, success.astype(np.float64), success, own.achieved, own.target)
            else:
                relabeled = self.scorer.score(task, episode.goal, episode, goals)
            # A relabeled goal is reached at its own step; one where the thing already stood at the start
            # asked for nothing, so imitating the way there teaches nothing either.
            ahead = goal_steps >= np.arange(len(actions))[:, None]
            moved = ~benchmark.goal_reached(task, own.achieved[0], goals)
            for i in range(goals.shape[1]):
                goal = goals[:, i]
                parts.append(rows(task, benchmark.with_goal(own.obs[:-1], goal), benchmark.with_goal(own.obs[1:], goal),
                                  goal, relabeled, i, GOAL_RELABEL, ahead[:, i] & moved[:, i]))
        for other, scores in self._task_relabels(episode):
            parts.append(rows(other, scores.obs[:-1], scores.obs[1:], scores.target, scores, 0, TASK_RELABEL,
                              reaches_goal(newly_reached(scores.success[:, 0]))))
        return _concatenate(parts)

    def _reward(self, scores: Scores) -> np.ndarray:
        return scores.success.astype(np.float64) if self.config.reward == "sparse" else scores.reward

    def _goal_steps(self, length: int) -> np.ndarray:
        """(T, k): for each transition, the steps whose achieved goals become its new goals."""
        k = self.config.goal_relabels
        if self.config.goal_strategy == "final":
            return np.full((length, 1), length - 1)
        low = np.arange(length)[:, None] if self.config.goal_strategy == "future" else 0
        return self.rng.integers(low, length, size=(length, k))

    def _task_relabels(self, episode: Episode) -> list[tuple[str, Scores]]:
        """The other tasks of the episode's scene that the strategy picks, with the episode scored under each."""
        strategy, count, task = self.config.task_strategy, self.config.task_relabels, episode.task
        candidates = [other for other in self.benchmark.scene(task) if other != task and other in self.tasks]
        if strategy == "none" or not candidates or isinstance(self.scorer, ObservedScorer):
            return []
        if strategy == "random":
            candidates = [candidates[i] for i in self.rng.permutation(len(candidates))[:count]]
        scored = [(other, self.scorer.score(other, episode.goal, episode)) for other in candidates]
        if strategy == "high":
            # A task that holds from the first state (window-close on a window-open episode) would score every
            # step until the episode undoes it: the most "successful" relabel, of actions that did nothing for it.
            returns = {other: self._reward(scores)[~held_from_start(scores.success[:, 0])].sum()
                       for other, scores in scored}
            scored = sorted((item for item in scored if returns[item[0]] >= self.config.high_return),
                            key=lambda item: -returns[item[0]])[:count]
        return scored

    def _write_online(self, rows: dict[str, np.ndarray]) -> None:
        count = len(rows["action"])
        if count > self.capacity:
            raise ValueError(f"an episode with its relabels has {count} transitions, more than the capacity "
                             f"{self.capacity}")
        index = (self._next + np.arange(count)) % self.capacity
        for key, column in self._online.items():
            column[index] = rows[key]
        self._next = (self._next + count) % self.capacity
        self.online_size = min(self.online_size + count, self.capacity)

    def _append_demos(self, rows: dict[str, np.ndarray]) -> None:
        self._demos = {key: np.concatenate([column, rows[key].astype(column.dtype)])
                       for key, column in self._demos.items()}

    # ---- sampling -----------------------------------------------------------------------------

    def sample(self, batch_size: int, history: int = 1, task_weights: np.ndarray | None = None,
               weigh_demos: bool = True) -> dict[str, np.ndarray]:
        """A batch with round(batch_size * demo_fraction) demo transitions and the rest online (all from one
        part while the other is empty); every column but sim_state, and the observation windows a policy
        with `history` frames reads: `obs_window` (B, history, obs_dim), each transition's obs after the
        ones before it in its episode, and `window_mask` (B, history), False for frames before the episode's
        start (or no longer stored), which repeat the earliest real frame, as LanguagePolicy pads.

        Every stored row is equally likely, so tasks with relabels fill more of the batch; `task_weights`
        (one per task, not all zero) instead gives each part's tasks those shares of its rows (among the
        tasks it holds), each task's rows equally likely; the online part's only if not `weigh_demos`."""
        if len(self) == 0:
            raise ValueError("sample: the replay buffer is empty")
        if task_weights is not None:
            task_weights = np.asarray(task_weights, dtype=np.float64)
            if task_weights.shape != (len(self.tasks),) or (task_weights < 0).any() or not task_weights.any():
                raise ValueError(f"sample: task_weights must be {len(self.tasks)} non-negative numbers, not all zero")
        demos = (batch_size if self.online_size == 0 else 0 if self.demo_size == 0
                 else round(batch_size * self.demo_fraction))
        demo_rows = self._draw(self._demos["task"], demos, task_weights if weigh_demos else None)
        online_rows = self._draw(self._online["task"][:self.online_size], batch_size - demos, task_weights)
        batch = {key: np.concatenate([self._demos[key][demo_rows], self._online[key][online_rows]])
                 for key in self.columns if key != "sim_state"}
        windows = [_windows(self._demos, demo_rows, history, self.benchmark.with_goal),
                   _windows(self._online, online_rows, history, self.benchmark.with_goal)]
        batch["obs_window"] = np.concatenate([frames for frames, _ in windows])
        batch["window_mask"] = np.concatenate([mask for _, mask in windows])
        return batch

    def _draw(self, tasks: np.ndarray, count: int, task_weights: np.ndarray | None) -> np.ndarray:
        """`count` row indices of a part whose rows have these task indices: uniform, or by rejection so that
        a row of task t is drawn with probability proportional to task_weights[t] / (rows of task t)."""
        if task_weights is None or count == 0:
            return self.rng.integers(0, len(tasks), size=count)
        rows_per_task = np.bincount(tasks, minlength=len(self.tasks))
        per_row = np.where(rows_per_task > 0, task_weights / np.maximum(rows_per_task, 1), 0.0)
        if not per_row.any():  # this part holds only tasks weighted zero
            return self.rng.integers(0, len(tasks), size=count)
        accept = per_row / per_row.max()
        drawn: list[np.ndarray] = []
        while sum(map(len, drawn)) < count:
            candidates = self.rng.integers(0, len(tasks), size=4 * count)
            drawn.append(candidates[self.rng.random(4 * count) < accept[tasks[candidates]]])
        return np.concatenate(drawn)[:count]

    # ---- saving -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as arrays and plain numbers: the stored rows of both parts, the
        ring's position, the episode counter and the sampling generator's state."""
        return {"tasks": list(self.tasks), "capacity": self.capacity,
                "online": {key: column[:self.online_size] for key, column in self._online.items()},
                "demos": self._demos, "next": self._next, "episodes": self._episodes,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` into a buffer made with the same tasks and capacity (the ring's order)."""
        if list(state["tasks"]) != self.tasks or state["capacity"] != self.capacity:
            raise ValueError(f"the saved replay buffer has tasks {', '.join(state['tasks'])} and capacity "
                             f"{state['capacity']}; this one {', '.join(self.tasks)} and {self.capacity}")
        size = len(state["online"]["action"])
        for key, column in self._online.items():
            column[:size] = state["online"][key]
        self._demos = {key: np.asarray(state["demos"][key], dtype=dtype) for key, (_, dtype) in self.columns.items()}
        self.online_size, self._next, self._episodes = size, int(state["next"]), int(state["episodes"])
        self.rng.bit_generator.state = state["rng"]


def _windows(part: dict[str, np.ndarray], rows: np.ndarray, history: int, with_goal) -> tuple[np.ndarray, np.ndarray]:
    """The last `history` observations up to each row. An episode and each of its relabeled copies are
    written as a contiguous run of steps, so the frame k steps back is k rows back (around the ring) as
    long as that row still holds the same episode's step - k. Goal relabels draw a goal per transition,
    so a window of one shows the row's goal in all its frames, as the policy would have seen it."""
    frames, real = [part["obs"][rows]], [np.ones(len(rows), dtype=bool)]
    size = len(part["obs"])
    for k in range(1, history):
        back = np.where(part["step"][rows] >= k, (rows - k) % max(size, 1), rows)
        same = (part["episode"][back] == part["episode"][rows]) & (part["step"][back] == part["step"][rows] - k)
        real.append(real[-1] & same)
        frames.append(np.where(real[-1][:, None], part["obs"][back], frames[-1]))
    window = np.stack(frames[::-1], axis=1)
    relabeled = part["relabel"][rows] == GOAL_RELABEL
    window[relabeled] = with_goal(window[relabeled], part["goal"][rows][relabeled][:, None])
    return window, np.stack(real[::-1], axis=1)


def _concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
