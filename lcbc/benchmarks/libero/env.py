"""LIBERO scenes as gymnasium environments with dict observations, their goal variations and state layout.

One place knows LIBERO's quirks: a task is a BDDL file; placements come from robosuite's samplers, which
draw from numpy's global generator; the official initial states are flattened MuJoCo states; images come
out upside down; the scene XML asks for a 4096 px shadow map and multisampling, which a CPU rasterizer
pays for on every frame; and objects dropped onto the table by a reset still move for a few steps.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from lcbc.errors import UserError

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("EGL_PLATFORM", "surfaceless")
os.environ.setdefault("LP_NUM_THREADS", "1")
# robosuite warns on import that no private macro file exists, a setup step LIBERO's scenes never need.
logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())

# Suite names after `libero:` and LIBERO's benchmark names.
SUITES = {"goal": "libero_goal", "spatial": "libero_spatial", "object": "libero_object", "10": "libero_10",
          "90": "libero_90"}
# Episode horizons per suite: the ones OpenVLA's LIBERO evaluation uses (a little above the longest human
# demonstration of each suite), so success rates compare with the published ones.
MAX_EPISODE_STEPS = {"libero_goal": 300, "libero_spatial": 220, "libero_object": 280, "libero_10": 520,
                     "libero_90": 400}
CAMERAS = ("agentview", "robot0_eye_in_hand")
# Fixtures that are the arena itself: they have no body of their own in the scene.
ARENA_CATEGORIES = {"table", "kitchen_table", "living_room_table", "study_table", "coffee_table", "floor"}
# Zero-motion steps (gripper open) after a reset, as LIBERO's own evaluation waits: objects placed by the
# sampler or an initial state settle onto the table before the episode's first observation.
SETTLE_STEPS = 10
OPEN_GRIPPER_STILL = np.array([0, 0, 0, 0, 0, 0, -1.0])
# Seeds of the placement sampler per split: no two splits share one. The sampler places the fixtures
# (cabinet, stove, rack: within 1-2 cm) as well as the movable objects; the test split's goals are LIBERO's
# 50 official initial states per task, which hold only the movable state, so its fixtures come from a seed.
SPLIT_SEED_OFFSET = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
OFFICIAL_INIT_STATES = 50
# The robot's joints start off its home pose by Gaussian noise of this std (radians), drawn with the
# placement seed: LIBERO's official initial states were made so (its scenes' default, which its own
# wrapper turns off), and a policy that only ever started from one exact pose fails on them.
JOINT_INIT_NOISE = 0.02
ROBOT_STATE = (("eef_pos", 3), ("eef_quat", 4), ("gripper_qpos", 2), ("joint_pos", 7))


@functools.cache
def suite(name: str):
    """LIBERO's benchmark object for `name` (libero_goal, ...), in its fixed task order."""
    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints the task order it applies
        return benchmark.get_benchmark(name)(task_order_index=0)


def bddl_path(task) -> str:
    from libero.libero import get_libero_path

    return os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)


@dataclass(frozen=True)
class StateLayout:
    """Where each named part sits in the flat `state`: the robot (end-effector position and xyzw quaternion,
    finger positions, arm joint angles), then each movable object's and each fixture's position and
    quaternion (BDDL order), then the fixtures' articulation joints (drawers, knobs)."""

    bodies: tuple[str, ...]
    joints: tuple[str, ...]

    @functools.cached_property
    def slices(self) -> dict[str, slice]:
        sizes = [*ROBOT_STATE, *((f"{body}_{part}", size) for body in self.bodies
                                 for part, size in (("pos", 3), ("quat", 4))), *((joint, 1) for joint in self.joints)]
        ends = np.cumsum([size for _, size in sizes])
        return {name: slice(end - size, end) for (name, size), end in zip(sizes, ends)}

    @property
    def size(self) -> int:
        return sum(part.stop - part.start for part in self.slices.values())

    @property
    def robot_size(self) -> int:
        return sum(size for _, size in ROBOT_STATE)


@functools.cache
def parsed_problem(bddl: str) -> dict:
    from libero.libero.envs import bddl_utils

    return bddl_utils.robosuite_parse_problem(bddl)


@functools.cache
def goal_predicates(bddl: str) -> tuple[tuple[str, ...], ...]:
    """The BDDL goal, a conjunction of (predicate, object[, object]) as LIBERO's own `_check_success` reads it."""
    return tuple(tuple(predicate) for predicate in parsed_problem(bddl)["goal_state"])


def goal_objects(bddl: str) -> frozenset[str]:
    """The objects a task's goal involves: a region counts as the object it belongs to (a drawer's region as
    the cabinet, the stove's cook region as the stove), and a region of the table as nothing, since the table
    is the arena every task shares."""
    regions = parsed_problem(bddl)["regions"]
    owners = (regions[name]["target"] if name in regions else name
              for predicate in goal_predicates(bddl) for name in predicate[1:])
    fixtures = parsed_problem(bddl)["fixtures"]
    arena = {name for category in ARENA_CATEGORIES for name in fixtures.get(category, ())}
    return frozenset(owners) - arena


@functools.cache
def scene_layout(bddl: str) -> StateLayout:
    """The state layout of a BDDL scene, read from the file and the objects' own XML (no simulator needed)."""
    from libero.libero.envs.objects import get_object_fn

    problem = parsed_problem(bddl)
    named = [(category, name) for group in ("objects", "fixtures") for category, names in problem[group].items()
             for name in names if category not in ARENA_CATEGORIES]
    joints = []
    for category, name in named:
        xml = get_object_fn(category)(name=name)
        joints += [joint.get("name") for joint in xml.worldbody.iter("joint") if joint.get("type") != "free"]
    return StateLayout(tuple(name for _, name in named), tuple(joints))


@contextlib.contextmanager
def seeded_global_numpy(seed: int):
    """robosuite's placement samplers draw from numpy's global generator: seed it for a block, then put
    back the caller's state."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


@dataclass(eq=False)
class Placement:
    """A goal variation: the placement sampler's seed and, for the test split, an official initial state
    (MuJoCo's flattened state) that then overrides where the movable objects and the robot start."""

    seed: int
    init_state: np.ndarray | None = None


def split_goal(suite_name: str, task_index: int, split: str, index: int) -> Placement:
    """A split's `index`-th goal variation; the test split's are the official initial states (index 0-49)."""
    seed = SPLIT_SEED_OFFSET[split] + index
    if split == "test":
        if not 0 <= index < OFFICIAL_INIT_STATES:
            raise UserError(f"LIBERO's test split is its {OFFICIAL_INIT_STATES} official initial states per task; "
                            f"index {index} is beyond them")
        return Placement(seed, np.asarray(suite(suite_name).get_task_init_states(task_index)[index], np.float64))
    return Placement(seed)


def speed_up_rendering(sim) -> None:
    """No shadows, a small shadow map and no multisampling: a 64 px frame renders in ~31 ms instead of ~130 ms
    on a CPU. Called before the first reset, which makes the offscreen context that reads these settings."""
    sim.model.light_castshadow[:] = 0
    sim.model.vis.quality.shadowsize = 512
    sim.model.vis.quality.offsamples = 0


class LiberoEnv(gym.Env):
    """One LIBERO task; `reset(options={"goal": goal})` starts on a placement seed or an initial state.

    Keys: `state` (see StateLayout), `robot_state` (its robot part) and, for each of `cameras`, `<camera>_rgb`
    (image_size x image_size x 3 uint8, upright). `info["scene_success"]` (from reset and every step) says
    which of `scene_goals` (task -> BDDL goal predicates of tasks in the same scene) hold.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task, max_episode_steps: int, scene_goals: dict[str, tuple], cameras: tuple[str, ...] = (),
                 image_size: int = 64):
        from libero.libero.envs import OffScreenRenderEnv
        from libero.libero.envs.env_wrapper import ControlEnv

        unknown = [camera for camera in cameras if camera not in CAMERAS]
        if unknown:
            raise UserError(f"--camera: LIBERO renders {', '.join(CAMERAS)}, not {unknown[0]!r}")
        self.cameras, self.max_episode_steps = tuple(cameras), max_episode_steps
        self.layout = scene_layout(bddl_path(task))
        # No hard reset: rebuilding the scene on every reset takes seconds and would undo speed_up_rendering.
        # ignore_done: the episode's end is this wrapper's business (max_episode_steps), not robosuite's horizon.
        options = dict(bddl_file_name=bddl_path(task), hard_reset=False, ignore_done=True,
                       camera_heights=image_size, camera_widths=image_size,
                       initialization_noise={"magnitude": JOINT_INIT_NOISE, "type": "gaussian"})
        if self.cameras:
            self._env = OffScreenRenderEnv(**options, camera_names=list(self.cameras))
            speed_up_rendering(self._env.sim)
        else:
            self._env = ControlEnv(**options, has_offscreen_renderer=False, use_camera_obs=False, camera_names=[])
        # Every goal is evaluated by this scene's own predicates, so its objects and regions must be this scene's.
        known = self._env.env.object_states_dict
        unknown = {name for goal in scene_goals.values() for predicate in goal for name in predicate[1:]} - set(known)
        if unknown:
            raise ValueError(f"{task.name}: the scene has no {', '.join(sorted(unknown))} for its tasks' goals")
        self.scene_goals = scene_goals
        sim = self._env.sim
        self._body_ids = [self._env.env.obj_body_id[body] for body in self.layout.bodies]
        self._joint_addresses = [sim.model.get_joint_qpos_addr(joint) for joint in self.layout.joints]
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (self.layout.size,), np.float64),
                  "robot_state": gym.spaces.Box(-np.inf, np.inf, (self.layout.robot_size,), np.float64)}
        for camera in self.cameras:
            spaces[f"{camera}_rgb"] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    def _observation(self, raw: dict) -> dict[str, np.ndarray]:
        data = self._env.sim.data
        robot = [raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"], raw["robot0_joint_pos"]]
        bodies = [part for body in self._body_ids for part in (data.body_xpos[body], _xyzw(data.body_xquat[body]))]
        joints = [data.qpos[self._joint_addresses]]
        state = np.concatenate([*robot, *bodies, *joints])
        obs = {"state": state, "robot_state": state[:self.layout.robot_size].copy()}
        for camera in self.cameras:
            obs[f"{camera}_rgb"] = np.ascontiguousarray(raw[f"{camera}_image"][::-1])
        return obs

    def reset(self, *, seed=None, options=None):
        """`options["goal"]`: a Placement; without one, the sampler draws from numpy's global generator."""
        super().reset(seed=seed)
        goal = (options or {}).get("goal")
        # A new scene's gripper starts with no finger command; without a hard reset it would keep the last one.
        for robot in self._env.robots:
            robot.gripper.current_action = np.zeros_like(robot.gripper.current_action)
        with seeded_global_numpy(goal.seed) if goal is not None else contextlib.nullcontext():
            self._env.reset()
        if goal is not None and goal.init_state is not None:
            self._env.set_init_state(goal.init_state)
        for _ in range(SETTLE_STEPS):
            raw, *_ = self._env.step(OPEN_GRIPPER_STILL)
        self._steps = 0
        return self._observation(raw), {"scene_success": self.scene_success()}

    def step(self, action):
        raw, reward, _, info = self._env.step(np.asarray(action, dtype=np.float64))
        self._steps += 1
        success = bool(self._env.check_success())
        info = dict(info, success=success, scene_success=self.scene_success())
        return self._observation(raw), float(success), False, self._steps >= self.max_episode_steps, info

    def scene_success(self) -> dict[str, bool]:
        """Which scene tasks' goals hold now, each evaluated as LIBERO's `_check_success` evaluates its own."""
        problem = self._env.env
        return {task: all(problem._eval_predicate(predicate) for predicate in goal)
                for task, goal in self.scene_goals.items()}

    def restart_step_limit(self) -> None:
        """A chained request starts: it gets `max_episode_steps` of its own in the same episode."""
        self._steps = 0

    def simulator_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel): the format of LIBERO's official initial states."""
        return self._env.get_sim_state()

    def close(self) -> None:
        self._env.close()


def _xyzw(wxyz: np.ndarray) -> np.ndarray:
    """MuJoCo's quaternions are w-first; robosuite's observations (the end effector's) are w-last."""
    return np.roll(wxyz, -1)
