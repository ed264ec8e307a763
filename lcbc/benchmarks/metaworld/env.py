"""Meta-World v3 as gymnasium environments with dict observations, its goal variations and experts.

One place knows Meta-World's quirks: goals come from `MT1(task, seed)` (a seed's 50 goal variations
per task), the 'corner' cameras render upside down, stepping past `max_path_length` raises, and
`info["success"]` is a float. Rendering settings are set here, when this plug-in is imported, and
nowhere in the generic code.
"""

from __future__ import annotations

import functools
import os
import pickle

import gymnasium as gym
import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("EGL_PLATFORM", "surfaceless")
# The CPU rasterizer gains nothing from threads at 64 px; parallelism comes from one process per env.
os.environ.setdefault("LP_NUM_THREADS", "1")

GOALS_PER_SEED = 50
ROBOT_STATE_DIM = 4  # hand xyz and gripper opening: what a robot knows about itself
FLIPPED_CAMERAS = {"corner", "corner2", "corner3", "corner4"}
# Where the fingertips' centre (what reach's success measures) sits relative to the hand position in
# state[0:3]: the gripper never turns, so this is constant to within 7 mm (measured along expert episodes).
FINGERTIP_OFFSET = (-0.001, 0.002, -0.045)
# Tasks whose goal (the state's last 3 numbers) is a free point in space and whose success is the distance
# to it of one thing the state shows: reach the fingertips (state[0:3] + FINGERTIP_OFFSET), push and
# pick-place the object (state[4:7]). Value: where that thing's xyz starts in the state, and the offset.
# Where the thing is at any step of an episode is a goal that episode achieved (hindsight relabeling).
# The other MT10 tasks carry a goal too, but it is fixed by where the object stands (drawer and window
# open or closed, door, button, peg box) and some compare one axis only, so any other goal would be one
# the task never poses.
ACHIEVED_GOAL_IN_STATE = {"reach-v3": (0, FINGERTIP_OFFSET), "push-v3": (4, (0.0, 0.0, 0.0)),
                          "pick-place-v3": (4, (0.0, 0.0, 0.0))}
GOAL_IN_STATE = slice(-3, None)  # the goal's xyz: the state's last 3 numbers (36:39)
# Benchmark seeds of each split's goal variations, 50 per seed. Seed 1 was the evaluation seed every
# recipe before the splits was tuned on, so it is validation; test seeds start far above any seed a
# collection or fine-tuning run reaches (training uses seed 0, then 2, 3, ...).
SPLIT_SEEDS = {"train": (0, *range(2, 500)), "validation": (1, *range(500, 1000)), "test": range(1000, 100_000)}


def split_seed(split: str, index: int) -> tuple[int, int]:
    """(benchmark seed, goal variation of that seed) of a split's `index`-th goal."""
    return SPLIT_SEEDS[split][index // GOALS_PER_SEED], index % GOALS_PER_SEED


@functools.cache
def goal_variations(task: str, seed: int) -> tuple:
    """The 50 goal variations Meta-World generates for `task` with `seed` (cached: building is slow)."""
    import metaworld

    return tuple(metaworld.MT1(task, seed=seed).train_tasks)


def split_goal(task: str, split: str, index: int):
    """The `index`-th goal variation of `task` in `split` (see SPLIT_SEEDS)."""
    seed, variation = split_seed(split, index)
    return goal_variations(task, seed)[variation]


def scene_of(goal) -> np.ndarray:
    """The goal variation's random vector (a metaworld Task's `rand_vec`), from which reset builds the scene."""
    return np.asarray(pickle.loads(goal.data)["rand_vec"], dtype=np.float64)


def goal_in_scene(task: str, scene: np.ndarray):
    """A metaworld Task that makes `task` reset into `scene`, goal in the observation (as in MT benchmarks)."""
    from metaworld import Task, env_dict

    data = {"env_cls": env_dict.ALL_V3_ENVIRONMENTS[task], "rand_vec": scene, "partially_observable": False}
    return Task(env_name=task, data=pickle.dumps(data))


def scripted_expert(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def simulator_state(env) -> np.ndarray:
    """A raw Meta-World env's qpos, qvel, mocap position and quaternion, concatenated. Positions, and so every
    reward and success Meta-World computes, follow from these; stepping on from a restored state also needs
    the mocap target, which the arm follows."""
    data = env.data
    return np.concatenate([data.qpos, data.qvel, data.mocap_pos.ravel(), data.mocap_quat.ravel()])


def simulator_state_size(env) -> int:
    model = env.model
    return model.nq + model.nv + 7 * model.nmocap


def restore_simulator_state(env, state: np.ndarray) -> None:
    """Put a `simulator_state` back into a raw Meta-World env and recompute positions and contacts (mj_forward)."""
    import mujoco

    model, data = env.model, env.data
    state = np.asarray(state, dtype=np.float64)
    if state.shape != (simulator_state_size(env),):
        raise ValueError(f"simulator state has shape {state.shape}, this model needs ({simulator_state_size(env)},)")
    qpos, qvel, mocap_pos, mocap_quat = np.split(state, np.cumsum([model.nq, model.nv, 3 * model.nmocap]))
    data.qpos[:], data.qvel[:] = qpos, qvel
    data.mocap_pos[:], data.mocap_quat[:] = mocap_pos.reshape(-1, 3), mocap_quat.reshape(-1, 4)
    mujoco.mj_forward(model, data)


class MetaWorldEnv(gym.Env):
    """One Meta-World task, observations as a dict; `reset(options={"goal": goal})` sets the goal variation.

    Keys: `state` (the 39-d vector), `robot_state` (hand xyz and gripper) and, for each of `cameras`,
    `<camera>_rgb` (image_size x image_size x 3 uint8, upright).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, goal=None, cameras: tuple[str, ...] = (), image_size: int = 64):
        self.task = task
        self.cameras = tuple(cameras)
        self._render = {"render_mode": "rgb_array", "camera_name": self.cameras[0], "width": image_size,
                        "height": image_size} if self.cameras else {}
        self._env = self._raw_env(task)
        self._envs = {task: self._env}  # one raw env per task this env has run (see switch_task)
        self.goal = goal if goal is not None else split_goal(task, "train", 0)
        self._env.set_task(self.goal)
        self.max_episode_steps = self._env.max_path_length
        self.action_space = self._env.action_space
        spaces = {
            "state": self._env.observation_space,
            "robot_state": gym.spaces.Box(-np.inf, np.inf, (ROBOT_STATE_DIM,), np.float64),
        }
        for camera in self.cameras:
            spaces[f"{camera}_rgb"] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    def _raw_env(self, task: str):
        from metaworld import env_dict

        env = env_dict.ALL_V3_ENVIRONMENTS[task](**self._render)
        if self.cameras:
            # Shadow and reflection passes redraw the 67k-triangle robot: without them a 64 px frame
            # renders 4x faster on a CPU (130 -> 30 ms). Training and evaluation images both come from here.
            env.model.light_castshadow[:] = 0
            env.model.mat_reflectance[:] = 0
        return env

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {"state": state, "robot_state": state[:ROBOT_STATE_DIM].copy()}
        for camera in self.cameras:
            obs[f"{camera}_rgb"] = self.render(camera)
        return obs

    def render(self, camera: str | None = None) -> np.ndarray:
        """The view from `camera` (the first of `cameras` by default), upright."""
        import mujoco

        camera = camera or self.cameras[0]
        renderer = self._env.mujoco_renderer
        renderer.camera_id = mujoco.mj_name2id(self._env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        image = self._env.render()
        return np.ascontiguousarray(image[::-1]) if camera in FLIPPED_CAMERAS else image

    def reset(self, *, seed=None, options=None):
        """Meta-World is deterministic given the goal variation: `seed` changes nothing."""
        super().reset(seed=seed)
        if options and options.get("goal") is not None:
            self.goal = options["goal"]
            self._use(self.goal.env_name)  # a goal of another task of the scene (after switch_task)
            self._env.set_task(self.goal)
        state, info = self._env.reset()
        return self._observation(state), info

    def step(self, action):
        state, reward, terminated, truncated, info = self._env.step(np.asarray(action, dtype=np.float64))
        info = dict(info, success=bool(info.get("success", 0.0) > 0.5))
        return self._observation(state), float(reward), terminated, truncated, info

    def switch_task(self, task: str) -> dict[str, np.ndarray]:
        """Go on from the current physical state as `task`, a task of the same scene (drawer-open and
        drawer-close load one model), with a fresh step limit; returns the observation, `goal` becomes the
        task's goal variation of this scene. Nothing moves: the task's own env is reset into this scene only
        for the attributes its reward and observation read (the goal, the handle's start), then given this
        state. Reset-free practice (`lcbc finetune --reset-free`) turns a drawer it opened into one to close.
        The same task restarts the step limit (Meta-World refuses to step past it)."""
        state = simulator_state(self._env)
        self._use(task)
        self.goal = goal_in_scene(task, scene_of(self.goal))
        self._env.set_task(self.goal)
        self._env.reset()
        restore_simulator_state(self._env, state)
        self._env._prev_obs = self._env._get_curr_obs_combined_no_goal()  # as after reset: no earlier frame
        box = self._env.sawyer_observation_space
        return self._observation(np.clip(self._env._get_obs(), box.low, box.high))

    def _use(self, task: str) -> None:
        if task not in self._envs:
            self._envs[task] = self._raw_env(task)
        self.task, self._env = task, self._envs[task]

    def simulator_state(self) -> np.ndarray:
        """qpos, qvel, mocap position and quaternion: enough to restore the scene exactly."""
        return simulator_state(self._env)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()

