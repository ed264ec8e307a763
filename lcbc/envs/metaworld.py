"""Meta-World v3 as gymnasium environments with dict observations, plus its benchmarks and experts.

One place knows Meta-World's quirks: goals come from `MT1(task, seed)` (a seed's 50 goal variations
per task), the 'corner' camera renders upside down, stepping past `max_path_length` raises, and
`info["success"]` is a float.
"""

from __future__ import annotations

import functools
import os

import gymnasium as gym
import numpy as np

from lcbc.errors import UserError

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
# Tasks whose expert and success ignore objects the state still shows, and where in the state they are:
# reach's puck lies wherever its goal variation put it (state[4:18], and state[22:36] a step earlier). A
# policy cloned from a few demos reads that position as the demo's name instead of reading the goal.
IGNORED_OBJECTS_IN_STATE = {"reach-v3": ((4, 18), (22, 36))}
# Tasks whose expert ignores the goal while its gripper is open, and the opening (state[3]) above which it
# is: pick-place's expert first moves above the puck, descends and closes on it, whatever the goal; only
# with the gripper closed (0.73 or less) does it head for the goal.
GOAL_IGNORED_WHILE_OPEN = {"pick-place-v3": 0.73}
GOAL_IN_STATE = slice(36, 39)
# Tasks whose expert acts on positions relative to each other only, so moving hand, object and goal
# together across the table leaves its action unchanged, and the axes (x, y) along which that holds:
# both for reach, push and pick-place; y only for peg-insert-side, whose expert carries the peg to a fixed
# x in front of the hole. Where their xyz start in the state: hand, object, the hand and object a step
# earlier, goal (the second object's slots stay zero).
SHIFT_AXES = {"reach-v3": (True, True), "push-v3": (True, True), "pick-place-v3": (True, True),
              "peg-insert-side-v3": (False, True)}
POSITIONS_IN_STATE = (0, 4, 18, 22, 36)
# Tasks whose expert first approaches its object relative to it alone: peg-insert-side's heads above the
# peg, then down to it, whatever the hole; only once the hand is at the peg (within 4 cm across and 2.5 cm
# in height) does it carry it to fixed x positions in front of and into the hole. While the peg still rests
# on the table (its grasp point below this height) and the hand is clearly away from it (4 cm in either),
# moving hand, peg and hole together in x as well keeps its action.
APPROACH_IN_X = {"peg-insert-side-v3": 0.035}
# Tasks whose hand and goal may move up together (never down, toward the table), with what rises along:
# reach's expert and success read the hand-to-goal offset alone and it touches nothing, so its hand (now
# and a step earlier) and goal rise, the puck stays; pick-place's expert, once it holds the puck off the
# table (gripper closed, puck above the 4 cm where it would still descend to it), heads for the goal, so
# then hand, puck and goal rise. The arm still reaches the raised goals: the hand goes up to z 0.5, goals
# lie at or below 0.3. Where the xyz of what rises start in the state.
RAISABLE_HAND_AND_GOAL = {"reach-v3": (0, 18, 36), "pick-place-v3": (0, 4, 18, 22, 36)}
# The gripper's opening at most (closed, as where the goal stops being ignored) and the puck's height at least.
HELD_OFF_THE_TABLE = {"pick-place-v3": (GOAL_IGNORED_WHILE_OPEN["pick-place-v3"], 0.04)}


def shift_axes(tasks: list[str]) -> np.ndarray:
    """(len(tasks), 2) bool: the axes along which each task's windows may move (SHIFT_AXES; none for others)."""
    return np.array([SHIFT_AXES.get(task, (False, False)) for task in tasks]).reshape(len(tasks), 2)


def approaching_in_x(windows: np.ndarray, tasks: list[str], task: np.ndarray) -> np.ndarray:
    """(B,) bool: which (B, H, D) state windows of tasks in APPROACH_IN_X are in their approach in every frame."""
    rows = np.zeros(len(windows), dtype=bool)
    hand, thing = windows[..., 0:3], windows[..., 4:7]
    away = (np.linalg.norm(hand[..., :2] - thing[..., :2], axis=-1) > 0.04) | (hand[..., 2] - thing[..., 2] > 0.04)
    for name, resting in APPROACH_IN_X.items():
        if name in tasks:
            rows |= (task == tasks.index(name)) & (away & (thing[..., 2] < resting)).all(axis=1)
    return rows


def move_positions_xy(windows: np.ndarray, axes: np.ndarray, max_shift: float, rng: np.random.Generator) -> None:
    """Move hand, object and goal of each (B, H, D) state window across the table by one uniform random
    offset of up to `max_shift` metres along its `axes` ((B, 2) bool, from `shift_axes`), in place."""
    rows = np.flatnonzero(axes.any(axis=1))
    shift = rng.uniform(-max_shift, max_shift, size=(len(rows), 1, 2)) * axes[rows, None, :]
    for start in POSITIONS_IN_STATE:
        windows[rows, :, start:start + 2] += shift.astype(windows.dtype)


def raise_hand_and_goal(windows: np.ndarray, tasks: list[str], task: np.ndarray, max_rise: float,
                        rng: np.random.Generator) -> None:
    """Move what rises (RAISABLE_HAND_AND_GOAL) of the (B, H, D) state windows up by one uniform random height in
    [0, max_rise] metres each, in place; pick-place's only where it holds the puck off the table in every
    frame. Few demonstrations' goals span little of the tasks' height range, and a policy cloned from them
    alone does not carry the hand above the heights it was shown."""
    for name, positions in RAISABLE_HAND_AND_GOAL.items():
        if name not in tasks:
            continue
        rows = task == tasks.index(name)
        if name in HELD_OFF_THE_TABLE:
            opening, height = HELD_OFF_THE_TABLE[name]
            rows &= ((windows[..., 3] <= opening) & (windows[..., 6] > height)).all(axis=1)
        rows = np.flatnonzero(rows)
        rise = rng.uniform(0.0, max_rise, size=(len(rows), 1)).astype(windows.dtype)
        for start in positions:
            windows[rows, :, start + 2] += rise


def replace_ignored_objects(windows: np.ndarray, rows: np.ndarray, task: str, donors: np.ndarray) -> None:
    """Give the (B, H, D) state windows `rows` of `task` the ignored objects of the (len(rows), D) `donors`
    states, in every frame (IGNORED_OBJECTS_IN_STATE: the task never moves them), in place."""
    for start, end in IGNORED_OBJECTS_IN_STATE.get(task, ()):
        windows[rows, :, start:end] = donors[:, None, start:end]


def replace_ignored_goals(windows: np.ndarray, rows: np.ndarray, task: str, donors: np.ndarray) -> None:
    """Give those of the (B, H, D) state windows `rows` of `task` whose last frame has the gripper open
    (GOAL_IGNORED_WHILE_OPEN) the goals of the (len(rows), D) `donors` states, in every frame, in place."""
    opening = GOAL_IGNORED_WHILE_OPEN.get(task)
    if opening is None:
        return
    open_rows = windows[rows, -1, 3] > opening
    windows[rows[open_rows], :, GOAL_IN_STATE] = donors[open_rows, None, GOAL_IN_STATE]


def benchmark_tasks(spec: str) -> list[str]:
    """Task names for 'MT10', 'MT50' or a comma-separated list of task names."""
    from metaworld import env_dict

    if spec.upper() == "MT10":
        return list(env_dict.MT10_V3.keys())
    if spec.upper() == "MT50":
        return list(env_dict.MT50_V3.keys())
    tasks = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in tasks if name not in env_dict.ALL_V3_ENVIRONMENTS]
    if unknown or not tasks:
        raise UserError(f"--benchmark: unknown Meta-World task {unknown[0] if unknown else spec!r}; "
                        "use MT10, MT50 or names like drawer-open-v3")
    return tasks


@functools.cache
def goal_variations(task: str, seed: int) -> tuple:
    """The 50 goal variations Meta-World generates for `task` with `seed` (cached: building is slow)."""
    import metaworld

    return tuple(metaworld.MT1(task, seed=seed).train_tasks)


def goal_for_episode(task: str, seed: int, episode: int):
    """Episode i uses goal i of the seed, then of seed+1, ... so every episode gets a new goal."""
    return goal_variations(task, seed + episode // GOALS_PER_SEED)[episode % GOALS_PER_SEED]


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
    """One Meta-World task with a fixed goal, observations as a dict.

    Keys: `state` (the 39-d vector), `robot_state` (hand xyz and gripper) and, when a camera is
    given, `<camera>_rgb` (image_size x image_size x 3 uint8, upright).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, goal=None, camera: str | None = None, image_size: int = 64,
                 seed: int = 0, episode: int = 0):
        from metaworld import env_dict

        self.task = task
        self.camera = camera
        render = {"render_mode": "rgb_array", "camera_name": camera, "width": image_size,
                  "height": image_size} if camera else {}
        self._env = env_dict.ALL_V3_ENVIRONMENTS[task](**render)
        if camera:
            # Shadow and reflection passes redraw the 67k-triangle robot: without them a 64 px frame
            # renders 4x faster on a CPU (130 -> 30 ms). Training and evaluation images both come from here.
            self._env.model.light_castshadow[:] = 0
            self._env.model.mat_reflectance[:] = 0
        self._env.set_task(goal if goal is not None else goal_for_episode(task, seed, episode))
        self.max_episode_steps = self._env.max_path_length
        self.action_space = self._env.action_space
        spaces = {
            "state": self._env.observation_space,
            "robot_state": gym.spaces.Box(-np.inf, np.inf, (ROBOT_STATE_DIM,), np.float64),
        }
        if camera:
            spaces[f"{camera}_rgb"] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    def set_goal(self, goal) -> None:
        self._env.set_task(goal)

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {"state": state, "robot_state": state[:ROBOT_STATE_DIM].copy()}
        if self.camera:
            obs[f"{self.camera}_rgb"] = self.render()
        return obs

    def render(self) -> np.ndarray:
        image = self._env.render()
        return np.ascontiguousarray(image[::-1]) if self.camera in FLIPPED_CAMERAS else image

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        state, info = self._env.reset()
        return self._observation(state), info

    def step(self, action):
        state, reward, terminated, truncated, info = self._env.step(np.asarray(action, dtype=np.float64))
        info = dict(info, success=bool(info.get("success", 0.0) > 0.5))
        return self._observation(state), float(reward), terminated, truncated, info

    def simulator_state(self) -> np.ndarray:
        """qpos, qvel, mocap position and quaternion: enough to restore the scene exactly."""
        return simulator_state(self._env)

    def close(self) -> None:
        self._env.close()

