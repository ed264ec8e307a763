"""Meta-World's own window augmentations: rules read off its scripted experts and task definitions.

They are this plug-in's, not the general recipe's: each names the tasks it applies to and why, and a
config turns them on by class path (`data.augmentation` for cloning, `model.actor_augmentation` for
fine-tuning). Every position index below is into Meta-World's 39-d state: hand xyz 0:3, gripper 3, first
object 4:7 (quaternion 7:11), second object 11:18, the same 18 numbers a step earlier 18:36, goal 36:39.
"""

from __future__ import annotations

import numpy as np

from lcbc.benchmarks.metaworld.env import GOAL_IN_STATE
from lcbc.data.augment import ActorAugmentation, WindowAugmentation
from lcbc.errors import UserError

# Tasks whose expert and success ignore objects the state still shows, and where in the state they are:
# reach's puck lies wherever its goal variation put it (state[4:18], and state[22:36] a step earlier). A
# policy cloned from a few demos reads that position as the demo's name instead of reading the goal.
IGNORED_OBJECTS_IN_STATE = {"reach-v3": ((4, 18), (22, 36))}
# Tasks whose expert ignores the goal while its gripper is open, and the opening (state[3]) above which it
# is: pick-place's expert first moves above the puck, descends and closes on it, whatever the goal; only
# with the gripper closed (0.73 or less) does it head for the goal.
GOAL_IGNORED_WHILE_OPEN = {"pick-place-v3": 0.73}
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


class StateAugmentation(WindowAugmentation):
    """Cloning's augmentations of Meta-World state windows (`data.augmentation` in configs/bc_mt10_state.yaml),
    applied in this order (hindsight goals are the general `data.relabel_state_goals`, through the goal
    interface):

    shuffle_ignored_objects: windows of tasks in IGNORED_OBJECTS_IN_STATE get those objects as a random
        step of another demo of the task had them, so the policy cannot tell demos apart by them.
    shift_xy: hand, objects and goal of the windows of tasks in SHIFT_AXES move together by up to this
        many metres across the table: those experts act on relative positions."""

    def __init__(self, shuffle_ignored_objects: bool = False, shift_xy: float = 0.0):
        if shift_xy < 0:
            raise UserError(f"StateAugmentation.shift_xy must be >= 0 metres, got {shift_xy}")
        self.shuffle_ignored_objects, self.shift_xy = shuffle_ignored_objects, shift_xy

    def bind(self, dataset) -> None:
        super().bind(dataset)
        if "state" not in dataset.low_dim:
            raise UserError("StateAugmentation needs Meta-World's 39-d 'state' observations")
        self.demo_shift_axes = shift_axes([dataset.tasks[index] for index in dataset.demo_task])

    def __call__(self, batch: dict, steps: np.ndarray, rng: np.random.Generator) -> None:
        state = batch["obs"]["state"]
        if self.shuffle_ignored_objects:
            self._shuffle_ignored_objects(state, steps, rng)
        if self.shift_xy > 0:
            move_positions_xy(state, self.demo_shift_axes[self.dataset.step_demo[steps]], self.shift_xy, rng)

    def _shuffle_ignored_objects(self, state: np.ndarray, steps: np.ndarray, rng: np.random.Generator) -> None:
        data = self.dataset
        task = data.demo_task[data.step_demo[steps]]
        for name in IGNORED_OBJECTS_IN_STATE:
            if name not in data.tasks:
                continue
            task_index = data.tasks.index(name)
            rows = np.flatnonzero(task == task_index)
            if not len(rows):
                continue
            pool = np.flatnonzero(data.demo_task[data.step_demo] == task_index)
            donors = pool[rng.integers(len(pool), size=len(rows))]
            replace_ignored_objects(state, rows, name, data.low_dim["state"][donors])


class ActorStateAugmentation(ActorAugmentation):
    """Fine-tuning's augmentations of the Meta-World state windows the actor clones
    (`model.actor_augmentation` in configs/finetune_mt10_metaworld_rules.yaml), in this order:

    shuffle_ignored_objects: reach's puck from another of the batch's reach rows.
    shuffle_ignored_goals: pick-place's goal while the gripper is open (GOAL_IGNORED_WHILE_OPEN) from
        another pick-place row.
    shift_xy: as StateAugmentation's, and peg-insert-side in x as well while it approaches the peg.
    shift_z: reach's hand and goal, and pick-place's while it holds the puck up, raised together by up to
        this many metres (RAISABLE_HAND_AND_GOAL)."""

    def __init__(self, shuffle_ignored_objects: bool = False, shuffle_ignored_goals: bool = False,
                 shift_xy: float = 0.0, shift_z: float = 0.0):
        for name, value in (("shift_xy", shift_xy), ("shift_z", shift_z)):
            if not value >= 0:
                raise UserError(f"ActorStateAugmentation.{name}: {value!r} is not a non-negative number of metres")
        self.shuffle_ignored_objects, self.shuffle_ignored_goals = shuffle_ignored_objects, shuffle_ignored_goals
        self.shift_xy, self.shift_z = shift_xy, shift_z

    def __call__(self, windows: np.ndarray, task: np.ndarray, tasks: list[str], rng: np.random.Generator) -> None:
        replacements = [(IGNORED_OBJECTS_IN_STATE, replace_ignored_objects)] if self.shuffle_ignored_objects else []
        if self.shuffle_ignored_goals:
            replacements.append((GOAL_IGNORED_WHILE_OPEN, replace_ignored_goals))
        for ignoring, replace in replacements:
            for name in ignoring:
                if name in tasks:
                    rows = np.flatnonzero(task == tasks.index(name))
                    donors = rows[rng.integers(len(rows), size=len(rows))]
                    replace(windows, rows, name, windows[donors, -1])
        if self.shift_xy > 0:
            axes = shift_axes(tasks)[task]
            axes[:, 0] |= approaching_in_x(windows, tasks, task)
            move_positions_xy(windows, axes, self.shift_xy, rng)
        if self.shift_z > 0:
            raise_hand_and_goal(windows, tasks, task, self.shift_z, rng)
