"""The multi-task replay buffer for RL fine-tuning, with reward, goal and task relabeling.

The tasks form one MDP: each transition carries its task index, and its 39-d Meta-World state carries
the goal in its last 3 dimensions. Demonstrations live in their own part, which the online ring never
overwrites, and a batch mixes the two parts in a fixed proportion.

Relabeling happens when an episode is added, so sampling stays an index gather. The relabeled
transitions are stored beside the original ones, tagged with the task and goal they were relabeled to,
zero rewards included: the critic learns from them what does not reach a goal.

Rewards are never copied, always recomputed by the task's own Meta-World code. Each transition keeps
the simulator state after its step; a cached env per task restores that state and calls the task's
`evaluate_state`, exactly what `env.step` does after simulating. The reward is Meta-World's success
(sparse: 1.0 or 0.0) or its shaped reward divided by its maximum, 10 (dense: 0-1 a step, 1 at success).

Meta-World's reward functions also read attributes that `reset` computes once per episode from the goal
variation (the random vector that places object and goal, called the scene here): obj_init_pos,
init_tcp, init_left_pad, init_right_pad, window_handle_pos_init... Before an episode is scored, its
task's env is set to the episode's goal variation and reset, which recomputes these exactly as they
were when the episode ran (they depend on the variation only, not on the env's earlier episodes). A
task relabel resets the other task's env on the same variation, so its attributes are the ones that
task computes for this scene: drawer-close's obj_init_pos is the pulled-out handle, even for a
drawer-open episode whose drawer starts closed. A goal relabel then replaces only `_target_pos`: the v2
rewards (Meta-World's default, used here) of reach, push and pick-place read no other goal-dependent
attribute; maxReachDist, maxPushDist and maxPlacingDist feed only the v1 rewards and stay as reset set
them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np

from lcbc.data.hdf5 import demo_instruction, open_demo_file, validate
from lcbc.envs.instructions import INSTRUCTIONS
from lcbc.envs.metaworld import (
    ACHIEVED_GOAL_IN_STATE,
    goal_for_episode,
    restore_simulator_state,
    simulator_state,
    simulator_state_size,
)
from lcbc.errors import UserError

REWARDS = ("sparse", "dense")
GOAL_STRATEGIES = ("none", "future", "final", "episode")
TASK_STRATEGIES = ("none", "all", "random", "high")

# The tasks with free goals (ACHIEVED_GOAL_IN_STATE), and what the simulator measures of each exactly:
# reach the fingertip centre (`tcp_center`, radius 0.05), push (0.05) and pick-place (0.07) the object.
ACHIEVED_GOAL = {task: "hand" if start == 0 else "object" for task, (start, _) in ACHIEVED_GOAL_IN_STATE.items()}
DENSE_REWARD_MAX = 10.0  # Meta-World v3's shaped rewards lie in [0, 10] and are 10 at success
SUCCESS_RADIUS = 0.05  # the smallest of the three (reach and push; pick-place 0.07)

# MT10 tasks that share a scene: the same physics (reach/push/pick-place XML files differ only in the
# goal site's position and colour; drawer-open/close and window-open/close load the same file; a test
# compares the compiled models) and a goal variation vector that means the same in each (object xyz and
# goal xyz; drawer xyz; window xyz). A stored state is a valid state of every task of its scene.
# door-open, button-press-topdown and peg-insert-side have scenes of their own.
SCENES = (("reach-v3", "push-v3", "pick-place-v3"), ("drawer-open-v3", "drawer-close-v3"),
          ("window-open-v3", "window-close-v3"))

ONLINE, DEMO = 0, 1  # the `source` column
ORIGINAL, GOAL_RELABEL, TASK_RELABEL = 0, 1, 2  # the `relabel` column
SOURCES = {"online": ONLINE, "demo": DEMO}

_TASK_OF_INSTRUCTION = {text: task for task, texts in INSTRUCTIONS.items() for text in texts}


@dataclass(frozen=True)
class RelabelConfig:
    """How rewards are defined and which relabeled transitions an episode adds.

    goal_strategy picks, for each transition of a goal-carrying task (ACHIEVED_GOAL), `goal_relabels`
    steps of the same episode whose achieved position becomes the new goal: 'future' a step at or after
    it, 'episode' any step, 'final' the last step (one relabel: more copies would be identical).
    task_strategy picks other tasks of the same scene (SCENES) to score the whole episode with: 'all',
    'random' (`task_relabels` of them), 'high' (the `task_relabels` best whose return reaches
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


def scene_of(goal) -> np.ndarray:
    """The goal variation's random vector (a metaworld Task's `rand_vec`), from which reset builds the scene."""
    return np.asarray(pickle.loads(goal.data)["rand_vec"], dtype=np.float64)


def goal_in_scene(task: str, scene: np.ndarray):
    """A metaworld Task that makes `task` reset into `scene`, goal in the observation (as in MT benchmarks)."""
    from metaworld import Task, env_dict

    data = {"env_cls": env_dict.ALL_V3_ENVIRONMENTS[task], "rand_vec": scene, "partially_observable": False}
    return Task(env_name=task, data=pickle.dumps(data))


def same_scene(task: str) -> tuple[str, ...]:
    return next((scene for scene in SCENES if task in scene), (task,))


@dataclass
class Scores:
    """One episode as one task's env sees it: T steps, T+1 states, k goals per step."""

    obs: np.ndarray  # (T+1, 39) the observation at each state, with the task's own goal
    reward: np.ndarray  # (T, k) Meta-World's dense reward of each step, for each goal
    success: np.ndarray  # (T, k)
    achieved: np.ndarray | None  # (T+1, 3) the achieved goal at each state, for ACHIEVED_GOAL tasks
    target: np.ndarray  # (3,) the task's own goal in this scene


class Scorer:
    """Scores stored simulator states under any task and goal, with one cached Meta-World env per task."""

    def __init__(self, tasks: list[str]):
        from metaworld import env_dict

        self.envs = {task: env_dict.ALL_V3_ENVIRONMENTS[task]() for task in tasks}
        self._scene_key: dict[str, bytes] = {}

    def state_size(self, task: str) -> int:
        return simulator_state_size(self.envs[task])

    def _prepare(self, task: str, scene: np.ndarray):
        """The task's env reset into `scene`; consecutive calls for one scene reuse the reset."""
        env = self.envs[task]
        if self._scene_key.get(task) != scene.tobytes():
            env.set_task(goal_in_scene(task, scene))
            env.reset()
            self._scene_key[task] = scene.tobytes()
        return env

    def score(self, task: str, scene: np.ndarray, states: np.ndarray, actions: np.ndarray,
              goals: np.ndarray | None = None) -> Scores:
        """Observations, rewards and successes of an episode under `task`: with its own goal, or with
        `goals` (T, k, 3), k goals for each step.

        Observations after a step are what env.step returns, bit for bit, except that the goal dimensions
        are never clipped (see `with_goal`). The first one is computed from the reset state; the reset of
        some tasks (drawer, window) ends on a physics step without mj_forward, so the hand position it
        returned lags that state by one substep (about 1e-4)."""
        env = self._prepare(task, scene)
        target = env._target_pos.copy()
        own_goal = goals is None
        if own_goal:
            goals = np.broadcast_to(target, (len(actions), 1, 3))
        box = env.sawyer_observation_space
        kind = ACHIEVED_GOAL.get(task)
        obs = np.empty((len(states), box.shape[0]))
        reward, success = np.empty(goals.shape[:2]), np.empty(goals.shape[:2], dtype=bool)
        achieved = np.empty((len(states), 3)) if kind else None
        for t, state in enumerate(states):
            restore_simulator_state(env, state)
            if t == 0:  # as after reset: no previous frame yet, so the current one stands in for it
                env._prev_obs = env._get_curr_obs_combined_no_goal()
            env._target_pos = target
            obs[t] = with_goal(np.clip(env._get_obs(), box.low, box.high), target)  # clipped as by env.step
            if kind:
                achieved[t] = env.tcp_center if kind == "hand" else env._get_pos_objects()
            if t == 0:
                continue
            for i, goal in enumerate(goals[t - 1]):
                seen = obs[t]
                if not own_goal:
                    env._target_pos = goal
                    seen = with_goal(obs[t], goal)
                reward[t - 1, i], info = env.evaluate_state(seen, actions[t - 1])
                success[t - 1, i] = info["success"] > 0.5
        env._target_pos = target
        return Scores(obs, reward, success, achieved, target)

    def step(self, task: str, scene: np.ndarray, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The simulator state after `action` from `state`. Demo files hold the states before each step, so
        the one after the last step is simulated again, from a fresh reset (Meta-World refuses to step past
        its step limit); the reset stays valid for scoring the same scene afterwards."""
        self._scene_key.pop(task, None)
        env = self._prepare(task, scene)
        restore_simulator_state(env, state)
        env.step(action)
        return simulator_state(env)


def reaches_goal(success: np.ndarray) -> np.ndarray:
    """(T,) success after each step -> (T,) whether the episode succeeds at that step or a later one: the
    transitions worth imitating when only successes are (FineTuning's `imitate: successful`)."""
    return np.logical_or.accumulate(success[::-1])[::-1]


def held_from_start(success: np.ndarray) -> np.ndarray:
    """(T,) success after each step -> (T,) whether the task has held since the first step."""
    return np.logical_and.accumulate(success)


def newly_reached(success: np.ndarray) -> np.ndarray:
    """(T,) success after each step, less the successes the episode starts with: a task that already holds
    in the first state (drawer-close scored on a drawer-open episode, whose drawer starts closed) asks
    nothing of the actions, so they are not imitated for it, as goals where the object already stood."""
    return success & ~held_from_start(success)


def with_goal(obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Observations with their goal dimensions replaced. env.step clips them to the task's goal box, but
    relabeled goals can lie outside it (hand positions for reach, push's goals at table height for reach
    and pick-place), and a clipped goal would disagree with the reward computed for the real one."""
    obs = np.array(obs)
    obs[..., -3:] = goal
    return obs


class ReplayBuffer:
    """Transitions of all tasks: a ring of `capacity` online transitions and a demo part it never overwrites.

    Columns: obs, next_obs (39-d, float32), action (4), reward, terminal (success for the transition's
    task and goal: every step from the first success on, including a demo's steps past it; a time limit
    is never terminal), task
    (index into `tasks`), goal (the goal the reward was computed with, float64), sim_state (after the
    step, padded with zeros to the largest task's size), episode, step, source (ONLINE, DEMO),
    relabel (ORIGINAL, GOAL_RELABEL, TASK_RELABEL) and reaches_goal (see `reaches_goal`).
    """

    def __init__(self, tasks: list[str], capacity: int, relabel: RelabelConfig | None = None,
                 demo_fraction: float = 0.25, seed: int = 0):
        from metaworld import env_dict

        unknown = [task for task in tasks if task not in env_dict.ALL_V3_ENVIRONMENTS]
        if unknown:
            raise ValueError(f"ReplayBuffer.tasks: unknown Meta-World task {unknown[0]!r}")
        if not tasks:
            raise ValueError("ReplayBuffer.tasks: no tasks")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReplayBuffer.capacity: {capacity!r} is not a positive integer")
        if not 0.0 <= demo_fraction <= 1.0:
            raise ValueError(f"ReplayBuffer.demo_fraction: {demo_fraction!r} is not between 0 and 1")
        self.tasks = list(tasks)
        self.capacity = capacity
        self.config = relabel or RelabelConfig()
        self.demo_fraction = demo_fraction
        self.rng = np.random.default_rng(seed)
        self.scorer = Scorer(self.tasks)
        obs_dim = next(iter(self.scorer.envs.values())).sawyer_observation_space.shape[0]
        sim_dim = max(self.scorer.state_size(task) for task in self.tasks)
        self.columns = {
            "obs": ((obs_dim,), np.float32), "next_obs": ((obs_dim,), np.float32), "action": ((4,), np.float32),
            "reward": ((), np.float32), "terminal": ((), bool), "task": ((), np.int64), "goal": ((3,), np.float64),
            "sim_state": ((sim_dim,), np.float64), "episode": ((), np.int64), "step": ((), np.int32),
            "source": ((), np.uint8), "relabel": ((), np.uint8), "reaches_goal": ((), bool),
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

    def add_episode(self, task: str, goal, states: np.ndarray, actions: np.ndarray, source: str = "online") -> int:
        """Store an episode and its relabels; returns its episode id.

        goal: the metaworld Task (goal variation) the episode ran with, as `goal_for_episode` gives it.
        states: (T+1, S) simulator states after reset and after each step (`MetaWorldEnv.simulator_state`).
        actions: (T, 4) the actions the env received.
        """
        if source not in SOURCES:
            raise ValueError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
        rows = self._episode_rows(task, scene_of(goal), states, actions, SOURCES[source])
        if source == "demo":
            self._append_demos(rows)
        else:
            self._write_online(rows)
        return int(rows["episode"][0])

    def load_demos(self, path) -> int:
        """Add every demo of an lcbc HDF5 file to the demo part; returns the transitions added (relabels
        included). A demo needs `states` and the `task`, `seed` and `episode` attributes lcbc's collection
        writes (they name its goal variation); its rewards are recomputed from the states."""
        with open_demo_file(path) as file:
            parts = [self._demo_rows(file, name, path) for name in validate(file, path)]
        rows = _concatenate(parts)
        self._append_demos(rows)
        return len(rows["action"])

    def _demo_rows(self, file, name: str, path) -> dict[str, np.ndarray]:
        group = file["data"][name]
        task = self._demo_task(file, name, path)
        if "states" not in group:
            raise UserError(f"{path}: {name}: no 'states' dataset (rewards are recomputed from simulator states)")
        for key in ("seed", "episode"):
            if key not in group.attrs:
                raise UserError(f"{path}: {name}: no '{key}' attribute (it names the Meta-World goal variation "
                                "the demo ran with)")
        states, actions = group["states"][()].astype(np.float64), group["actions"][()].astype(np.float64)
        size = self.scorer.state_size(task)
        if states.ndim != 2 or states.shape[1] != size or actions.shape[1] != 4:
            raise UserError(f"{path}: {name}: states has shape {states.shape} and actions {actions.shape}; "
                            f"{task} needs (T, {size}) simulator states and (T, 4) actions")
        scene = scene_of(goal_for_episode(task, int(group.attrs["seed"]), int(group.attrs["episode"])))
        final = self.scorer.step(task, scene, states[-1], actions[-1])
        return self._episode_rows(task, scene, np.vstack([states, final]), actions, DEMO)

    def _demo_task(self, file, name: str, path) -> str:
        """The demo's `task` attribute (lcbc writes it), else the task its instruction belongs to."""
        value = file["data"][name].attrs.get("task")
        if value is not None:
            task = value.decode() if isinstance(value, bytes) else str(value)
        else:
            text = demo_instruction(file, name, path)
            task = _TASK_OF_INSTRUCTION.get(text)
            if task is None:
                raise UserError(f"{path}: {name}: no 'task' attribute, and instruction {text!r} is no Meta-World "
                                "task's")
        if task not in self.tasks:
            raise UserError(f"{path}: {name}: task {task!r} is not one of this buffer's tasks "
                            f"({', '.join(self.tasks)})")
        return task

    def _episode_rows(self, task: str, scene: np.ndarray, states, actions, source: int) -> dict[str, np.ndarray]:
        """The episode's transitions, then its goal relabels, then its task relabels."""
        if task not in self.tasks:
            raise ValueError(f"task: {task!r} is not one of this buffer's tasks ({', '.join(self.tasks)})")
        states, actions = np.asarray(states, dtype=np.float64), np.asarray(actions, dtype=np.float64)
        size = self.scorer.state_size(task)
        if actions.ndim != 2 or actions.shape[1] != 4 or len(actions) < 1 or states.shape != (len(actions) + 1, size):
            raise ValueError(f"episode of {task}: states has shape {states.shape} and actions {actions.shape}; "
                             f"expected (T+1, {size}) and (T, 4) with T >= 1")
        episode = self._episodes
        self._episodes += 1
        padded = np.zeros((len(actions), self.columns["sim_state"][0][0]))
        padded[:, :size] = states[1:]

        def rows(task_name, obs, next_obs, goal, scores: Scores, goal_index: int, kind: int,
                 reaches: np.ndarray) -> dict[str, np.ndarray]:
            steps = len(actions)
            return {"obs": obs, "next_obs": next_obs, "action": actions, "reaches_goal": reaches,
                    "reward": self._reward(scores)[:, goal_index], "terminal": scores.success[:, goal_index],
                    "task": np.full(steps, self.tasks.index(task_name)),
                    "goal": np.broadcast_to(goal, (steps, 3)), "sim_state": padded, "episode": np.full(steps, episode),
                    "step": np.arange(steps), "source": np.full(steps, source), "relabel": np.full(steps, kind)}

        own = self.scorer.score(task, scene, states, actions)
        parts = [rows(task, own.obs[:-1], own.obs[1:], own.target, own, 0, ORIGINAL, reaches_goal(own.success[:, 0]))]
        if self.config.goal_strategy != "none" and task in ACHIEVED_GOAL:
            goal_steps = self._goal_steps(len(actions))
            goals = own.achieved[goal_steps + 1]  # achieved[t + 1]: after step t
            relabeled = self.scorer.score(task, scene, states, actions, goals)
            # A relabeled goal is reached at its own step; one where the thing already stood at the start
            # asked for nothing, so imitating the way there teaches nothing either.
            ahead = goal_steps >= np.arange(len(actions))[:, None]
            moved = np.linalg.norm(goals - own.achieved[0], axis=-1) > SUCCESS_RADIUS
            for i in range(goals.shape[1]):
                goal = goals[:, i]
                parts.append(rows(task, with_goal(own.obs[:-1], goal), with_goal(own.obs[1:], goal), goal,
                                  relabeled, i, GOAL_RELABEL, ahead[:, i] & moved[:, i]))
        for other, scores in self._task_relabels(task, scene, states, actions):
            parts.append(rows(other, scores.obs[:-1], scores.obs[1:], scores.target, scores, 0, TASK_RELABEL,
                              reaches_goal(newly_reached(scores.success[:, 0]))))
        return _concatenate(parts)

    def _reward(self, scores: Scores) -> np.ndarray:
        return scores.success.astype(np.float64) if self.config.reward == "sparse" else scores.reward / DENSE_REWARD_MAX

    def _goal_steps(self, length: int) -> np.ndarray:
        """(T, k): for each transition, the steps whose achieved goals become its new goals."""
        k = self.config.goal_relabels
        if self.config.goal_strategy == "final":
            return np.full((length, 1), length - 1)
        low = np.arange(length)[:, None] if self.config.goal_strategy == "future" else 0
        return self.rng.integers(low, length, size=(length, k))

    def _task_relabels(self, task: str, scene, states, actions) -> list[tuple[str, Scores]]:
        """The other tasks of the episode's scene that the strategy picks, with the episode scored under each."""
        strategy, count = self.config.task_strategy, self.config.task_relabels
        candidates = [other for other in same_scene(task) if other != task and other in self.tasks]
        if strategy == "none" or not candidates:
            return []
        if strategy == "random":
            candidates = [candidates[i] for i in self.rng.permutation(len(candidates))[:count]]
        scored = [(other, self.scorer.score(other, scene, states, actions)) for other in candidates]
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
        windows = [_windows(self._demos, demo_rows, history), _windows(self._online, online_rows, history)]
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


def _windows(part: dict[str, np.ndarray], rows: np.ndarray, history: int) -> tuple[np.ndarray, np.ndarray]:
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
