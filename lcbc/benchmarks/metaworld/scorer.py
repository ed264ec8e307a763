"""Scoring stored Meta-World simulator states under any task of their scene and any goal.

Rewards are never copied, always recomputed by the task's own Meta-World code. Each transition keeps
the simulator state after its step; a cached env per task restores that state and calls the task's
`evaluate_state`, exactly what `env.step` does after simulating. The dense reward is Meta-World's shaped
reward divided by its maximum, 10 (0-1 a step, 1 at success).

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

import numpy as np

from lcbc.benchmarks.metaworld.env import (
    ACHIEVED_GOAL_IN_STATE,
    GOAL_IN_STATE,
    goal_in_scene,
    restore_simulator_state,
    scene_of,
    simulator_state,
    simulator_state_size,
)
from lcbc.rl.replay import Episode, Scores

DENSE_REWARD_MAX = 10.0  # Meta-World v3's shaped rewards lie in [0, 10] and are 10 at success
# What the simulator measures exactly of each task with a free goal: the fingertip centre or the object.
ACHIEVED_GOAL = {task: "hand" if start == 0 else "object" for task, (start, _) in ACHIEVED_GOAL_IN_STATE.items()}


def with_goal(obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Observations with their goal dimensions replaced. env.step clips them to the task's goal box, but
    relabeled goals can lie outside it (hand positions for reach, push's goals at table height for reach
    and pick-place), and a clipped goal would disagree with the reward computed for the real one."""
    obs = np.array(obs)
    obs[..., GOAL_IN_STATE] = goal
    return obs


class SimulatorScorer:
    """Scores stored simulator states under any task and goal, with one cached Meta-World env per task."""

    def __init__(self, tasks: list[str]):
        from metaworld import env_dict

        self.envs = {task: env_dict.ALL_V3_ENVIRONMENTS[task]() for task in tasks}
        self._scene_key: dict[str, bytes] = {}
        first = next(iter(self.envs.values()))
        self.obs_dim = first.sawyer_observation_space.shape[0]
        self.action_dim = first.action_space.shape[0]

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

    def score(self, task: str, goal, episode: Episode, goals: np.ndarray | None = None) -> Scores:
        """Observations, rewards and successes of an episode under `task`: with its own goal, or with
        `goals` (T, k, 3), k goals for each step.

        Observations after a step are what env.step returns, bit for bit, except that the goal dimensions
        are never clipped (see `with_goal`). The first one is computed from the reset state; the reset of
        some tasks (drawer, window) ends on a physics step without mj_forward, so the hand position it
        returned lags that state by one substep (about 1e-4)."""
        if episode.states is None:
            raise ValueError(f"episode of {task}: no simulator states to score")
        states, actions = episode.states, episode.actions
        env = self._prepare(task, scene_of(goal))
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
            for i, goal_xyz in enumerate(goals[t - 1]):
                seen = obs[t]
                if not own_goal:
                    env._target_pos = goal_xyz
                    seen = with_goal(obs[t], goal_xyz)
                reward[t - 1, i], info = env.evaluate_state(seen, actions[t - 1])
                success[t - 1, i] = info["success"] > 0.5
        env._target_pos = target
        return Scores(obs, reward / DENSE_REWARD_MAX, success, achieved, target)

    def final_state(self, task: str, goal, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The simulator state after a demo's last step (files hold the states before each step), simulated
        again from a fresh reset (Meta-World refuses to step past its step limit); the reset stays valid
        for scoring the same scene afterwards."""
        self._scene_key.pop(task, None)
        env = self._prepare(task, scene_of(goal))
        restore_simulator_state(env, states[-1])
        env.step(actions[-1])
        return simulator_state(env)
