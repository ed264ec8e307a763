"""Scripted experts for LIBERO-Goal's tasks, written from the poses in the flat state.

Each expert is a rule of the current state alone (no memory between steps), so one expert serves every
episode and a policy cloned from it sees one consistent answer per state: where the gripper should go next
(a point in the world), whether it should close, and which way it should point. The operational-space
controller takes 7-d deltas: xyz (1 = 5 cm), axis-angle rotation (1 = 0.5 rad) and the gripper (-1 open,
+1 close); `Expert` turns a `Move` into one with a proportional rule.

Scene geometry (measured in the scene, world frame, metres): the gripper's site sits between its finger
pads, which part along world y when it points down, and the hand is 20 cm wide along them (21 cm, 7 cm
thick, from 2.4 to 12.6 cm above the site when it points down); closed fingertips touch the table (0.90)
with the site at 0.906. The cabinet always stands turned by pi, its drawers slide out toward +y (joint value
negative when open), each handle a bar 10 cm in front of the cabinet's origin. The opened top drawer shows
12 cm of its inside in front of the cabinet (floor at 1.064, walls to 1.12) and reaches over the bowl's
place on the table, 1.054 m up: a hand grasping the bowl there hits it. The stove's knob turns about z and
its pointer reaches 4 cm toward +x. The plate is 14 cm across, its rim 1.9 cm tall and sloping, 4.5 cm
from the centre inside; LIBERO's region in front of the stove is 8 cm square around (-0.05, 0.21), with the
cream cheese (8 x 4 cm) between it and the plate's start. The wine rack's top shelf slopes up toward -y at
31 degrees with a 1.8 cm lip along its lower edge; LIBERO counts a bottle on the rack when its origin (the
middle of its bottom) is within 10 cm of the shelf's middle across it, within 2.2 cm of the lip's middle
along the lip and up to 10 cm in from it, and it touches the rack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

CLOSE, OPEN = 1.0, -1.0
POSITION_STEP, ROTATION_STEP = 0.05, 0.5  # what an action of 1 asks the controller for: metres, radians
POSITION_GAIN = 2.0  # asks for twice the way left: full speed from 2.5 cm away
# Pointing down, fingers parting along y; and pointing at the cabinet (-y), fingers parting along z.
DOWN = Rotation.from_matrix(np.diag([1.0, -1.0, -1.0]))
AT_CABINET = Rotation.from_euler("x", -np.pi / 2) * DOWN
# Pointing down, turned so that the fingers part along the bowl's radius where BOWL_RIM grasps it.
AT_BOWL_RIM = Rotation.from_euler("z", np.pi / 3) * DOWN  # the other way round, the wrist reaches its limit
# Pointing down, fingers parting along x: the hand, 20 cm wide along them, then keeps off the cabinet (-y).
ACROSS = Rotation.from_euler("z", np.pi / 2) * DOWN

BOWL, CHEESE, BOTTLE, PLATE = "akita_black_bowl_1", "cream_cheese_1", "wine_bottle_1", "plate_1"
CABINET, STOVE, RACK = "wooden_cabinet_1", "flat_stove_1", "wine_rack_1"
DRAWER_HANDLE_Z = {"top": 0.184, "middle": 0.110, "bottom": 0.042}  # above the cabinet's origin
DRAWER_OPENED, DRAWER_COUNTED_OPEN = -0.155, -0.14  # LIBERO counts a drawer open below -0.14; it stops at -0.16
TURN_Z = 1.17  # the hand turns from pointing down to pointing at the cabinet no lower than this (home: 1.19)
CLEAR_OF_HANDLE = np.array([0, 0.12, 0.04])  # where the hand backs off to from an opened drawer's handle
HANDLE_HELD = (0.006, 0.02)  # finger openings of a grip on the 1.6 cm handle bar; below it, they slipped off
KNOB_ON, KNOB_LEVER = 0.7, 0.03  # LIBERO counts the stove on from 0.5 rad; where on the pointer to push
PUSH_Z = 0.945  # the site's height that puts the fingertips across the knob's pointer
# Inside LIBERO's main_table_stove_front_region (centre -0.05, 0.21; +-4 cm in x and y), 2 cm off its centre
# away from the stove: a plate pushed to the centre jams the cream cheese against the stove and rides up on it.
STOVE_FRONT = np.array([-0.03, 0.225])
PLATE_TOLERANCE, PLATE_PUSH_STEP = 0.015, 0.0125
PLATE_FLOOR, PLATE_PUSH_Z = 0.06, 0.908  # about the rim's radius; fingertips on the plate's floor


@dataclass
class Move:
    target: np.ndarray  # where the gripper's site should go
    grip: float = OPEN
    orientation: Rotation = DOWN


class Scene:
    """Named views into one flat state (see env.StateLayout)."""

    def __init__(self, state: np.ndarray, layout):
        self.state, self.layout = np.asarray(state, dtype=np.float64), layout

    def __getitem__(self, name: str) -> np.ndarray:
        return self.state[self.layout.slices[name]]

    def pos(self, body: str) -> np.ndarray:
        return self[f"{body}_pos"]

    def joint(self, name: str) -> float:
        return float(self[name][0])

    @property
    def eef(self) -> np.ndarray:
        return self["eef_pos"]

    @property
    def finger_opening(self) -> float:
        """Half the distance between the fingers: 0.039 open, 0 closed on nothing."""
        left, right = self["gripper_qpos"]
        return float(left - right) / 2

    def drawer_handle(self, level: str) -> np.ndarray:
        slide = self.joint(f"{CABINET}_{level}_level")
        return self.pos(CABINET) + np.array([0.002, 0.102 - slide, DRAWER_HANDLE_Z[level]])


class Expert:
    """A task's rule (Scene -> Move) as a policy: observation dict -> 7-d action."""

    def __init__(self, rule: Callable[[Scene], Move], layout):
        self.rule, self.layout = rule, layout

    def __call__(self, obs: dict) -> np.ndarray:
        scene = Scene(obs["state"], self.layout)
        move = self.rule(scene)
        position = np.clip(POSITION_GAIN * (move.target - scene.eef) / POSITION_STEP, -1, 1)
        current = Rotation.from_quat(scene["eef_quat"])  # x, y, z, w
        rotation = np.clip((move.orientation * current.inv()).as_rotvec() / ROTATION_STEP, -1, 1)
        return np.concatenate([position, rotation, [move.grip]]).astype(np.float32)


def turned(scene: Scene, orientation: Rotation) -> float:
    """How far (radians) the gripper has yet to turn to `orientation`."""
    return (orientation * Rotation.from_quat(scene["eef_quat"]).inv()).magnitude()


def toward(scene: Scene, goal: np.ndarray, grip: float, travel_z: float, orientation: Rotation = DOWN,
           reach: float = 0.015) -> Move:
    """Go to `goal` by way of `travel_z`: up first when far away, across, then down onto it."""
    eef = scene.eef
    if np.linalg.norm(eef[:2] - goal[:2]) > reach:
        if eef[2] < travel_z - 0.03 and np.linalg.norm(eef[:2] - goal[:2]) > 0.04:
            return Move(np.array([*eef[:2], travel_z]), grip, orientation)
        return Move(np.array([*goal[:2], max(travel_z, goal[2])]), grip, orientation)
    return Move(goal, grip, orientation)


@dataclass
class PickPlace:
    """Grasp `thing` at `grasp` from its origin, carry it over `destination(scene)`, open once its origin is
    within half `tolerance` of it and `release` above it, and rise once it rests within `tolerance`."""

    thing: str
    grasp: tuple[float, float, float]
    destination: Callable[[Scene], np.ndarray]
    release: float
    travel_z: float
    held_opening: float  # the fingers are closed on it below this opening
    tolerance: float = 0.02
    orientation: Rotation = DOWN

    def __call__(self, scene: Scene) -> Move:
        grasp = scene.pos(self.thing) + np.array(self.grasp)
        goal = self.destination(scene)
        thing = scene.pos(self.thing)
        near_hand = np.linalg.norm(scene.eef - grasp) < 0.025
        if near_hand and scene.finger_opening < self.held_opening:
            above_goal = np.linalg.norm(thing[:2] - goal[:2]) < self.tolerance / 2
            if above_goal and thing[2] < goal[2] + self.release + 0.01:
                return Move(scene.eef, OPEN, self.orientation)
            carry = goal + np.array([0, 0, self.release]) + np.array(self.grasp)
            return toward(scene, carry, CLOSE, self.travel_z, self.orientation, reach=0.01)
        if np.linalg.norm(thing[:2] - goal[:2]) < self.tolerance and thing[2] < goal[2] + self.release:
            return Move(np.array([*scene.eef[:2], self.travel_z]), OPEN, self.orientation)  # done: rise, stay clear
        if near_hand and np.linalg.norm(scene.eef - grasp) < 0.01:
            return Move(grasp, CLOSE, self.orientation)
        return toward(scene, grasp, OPEN, grasp[2] + 0.08, self.orientation, reach=0.01)


def open_drawer(level: str, until: float = DRAWER_OPENED) -> Callable[[Scene], Move]:
    """Point the gripper at the cabinet, close it around the handle bar from the front, pull it out to `until`."""

    def rule(scene: Scene) -> Move:
        handle = scene.drawer_handle(level)
        if scene.joint(f"{CABINET}_{level}_level") < until:
            return Move(handle + CLEAR_OF_HANDLE, OPEN, AT_CABINET)
        grasp = handle - np.array([0, 0.005, 0])  # the finger pads all around the bar
        offset = scene.eef - grasp
        if np.linalg.norm(offset) < 0.03 and HANDLE_HELD[0] < scene.finger_opening < HANDLE_HELD[1]:
            return Move(grasp + np.array([0, 0.02, 0]), CLOSE, AT_CABINET)
        if np.linalg.norm(offset) < 0.008:
            return Move(grasp, CLOSE, AT_CABINET)
        aligned = np.linalg.norm(offset[[0, 2]]) < 0.01 and -0.01 < offset[1] < 0.13
        pointing = turned(scene, AT_CABINET) < 0.1
        if aligned and pointing:
            return Move(grasp, OPEN, AT_CABINET)
        # From above: the hand, 20 cm wide along z when pointing at the cabinet, would sweep the bowl away.
        move = toward(scene, grasp + np.array([0, 0.10, 0]), OPEN, grasp[2] + 0.06, AT_CABINET, reach=0.01)
        if turned(scene, AT_CABINET) > 0.3:
            # Turning to the cabinet low down (where another task may have left the hand) locks the arm: rise
            # first, then turn on the way, no lower than where the turn began.
            if scene.eef[2] < TURN_Z - 0.05:
                return Move(np.array([*scene.eef[:2], TURN_Z]), OPEN, Rotation.from_quat(scene["eef_quat"]))
            move.target[2] = max(move.target[2], scene.eef[2])
        return move

    return rule


def open_drawer_then(level: str, then: Callable[[Scene], Move]) -> Callable[[Scene], Move]:
    """Open the drawer, back the fingers off its handle still pointing at the cabinet, then follow `then`."""
    opening = open_drawer(level)

    def rule(scene: Scene) -> Move:
        near_handle = np.linalg.norm(scene.eef - scene.drawer_handle(level)) < 0.06 and turned(scene, AT_CABINET) < 0.3
        if scene.joint(f"{CABINET}_{level}_level") > DRAWER_COUNTED_OPEN or near_handle:
            return opening(scene)
        return then(scene)

    return rule


def turn_on_stove(scene: Scene) -> Move:
    """Closed fingers behind the knob's pointer, then along its arc until LIBERO counts the stove on."""
    angle = scene.joint(f"{STOVE}_button")
    if angle > KNOB_ON:
        return Move(np.array([*scene.eef[:2], PUSH_Z + 0.08]), CLOSE)
    radial, tangent = np.array([np.cos(angle), np.sin(angle), 0]), np.array([-np.sin(angle), np.cos(angle), 0])
    contact = scene.pos(STOVE) + KNOB_LEVER * radial + np.array([0, 0, PUSH_Z - scene.pos(STOVE)[2]])
    start = contact - 0.03 * tangent
    if scene.eef[2] < PUSH_Z + 0.015 and np.linalg.norm(scene.eef - contact) < 0.035:
        return Move(contact + 0.03 * tangent, CLOSE)
    return toward(scene, start, CLOSE, PUSH_Z + 0.06, reach=0.008)


def push_plate(scene: Scene) -> Move:
    """Closed fingers down inside the plate, then on toward the region in front of the stove: the rim, caught
    from the inside, cannot slip away sideways as it would from a push from outside."""
    plate, goal = scene.pos(PLATE), STOVE_FRONT
    if np.linalg.norm(plate[:2] - goal[:2]) < PLATE_TOLERANCE:
        return Move(np.array([*scene.eef[:2], PLATE_PUSH_Z + 0.1]), CLOSE, ACROSS)
    inside = np.linalg.norm(scene.eef[:2] - plate[:2]) < PLATE_FLOOR and scene.eef[2] < PLATE_PUSH_Z + 0.02
    if inside:  # the hand slides to the line through the plate's centre along the way left, at half speed:
        # faster, the fingers hop over the rim; off that line, the rim slants them up and the plate sideways
        way = goal[:2] - plate[:2]
        way /= np.linalg.norm(way)
        ahead = (scene.eef[:2] - plate[:2]) @ way
        aim = np.array([*(goal[:2] + ahead * way), PLATE_PUSH_Z]) - scene.eef
        if scene.eef[2] > PLATE_PUSH_Z + 0.009:  # down onto the floor first: higher, the fingertips pass the rim
            aim[:2] = 0
        return Move(scene.eef + aim * min(1.0, PLATE_PUSH_STEP / np.linalg.norm(aim)), CLOSE, ACROSS)
    return toward(scene, np.array([*plate[:2], PLATE_PUSH_Z]), CLOSE, PLATE_PUSH_Z + 0.08, ACROSS, reach=0.008)


def burner(scene: Scene) -> np.ndarray:
    return scene.pos(STOVE) + np.array([0.15, 0, 0])


def in_top_drawer(scene: Scene) -> np.ndarray:
    """The top drawer's floor, midway across what an opened drawer shows in front of the cabinet (12 cm in y)."""
    return scene.drawer_handle("top") + np.array([-0.006, -0.092, -0.027])


def bottle_on_rack(scene: Scene) -> Move:
    """Grasp the bottle's neck from above, tilt it along the rack's top shelf while carrying it high over the
    rack, lower it onto the shelf and let go; LIBERO counts it on the rack once its bottom rests by the lip."""
    bottle, slot = scene.pos(BOTTLE), scene.pos(RACK) + RACK_SLOT
    neck = bottle + Rotation.from_quat(scene[f"{BOTTLE}_quat"]).apply(BOTTLE_NECK)
    held = np.linalg.norm(scene.eef - neck) < 0.025 and scene.finger_opening < NECK_HELD
    # At the slot across the shelf (x) anywhere within 5 cm: the shelf's middle 20 cm count.
    at_slot = np.linalg.norm((bottle - slot)[1:]) < 0.02 and abs(bottle[0] - slot[0]) < 0.05
    if at_slot or (not held and bottle[2] > slot[2] - 0.05):
        # Let go, then back off along the bottle, off the end of its neck.
        back = 0 if held else 0.1
        return Move(scene.eef + back * RACK_TILT.apply([0, 0, 1]), OPEN, RACK_TILT * DOWN)
    if held:
        carry = slot + RACK_TILT.apply(BOTTLE_NECK) + np.array([0, 0, 0.01])
        return toward(scene, carry, CLOSE, RACK_TRAVEL_Z, RACK_TILT * DOWN, reach=0.01)
    if np.linalg.norm(scene.eef - neck) < 0.01:
        return Move(neck, CLOSE)
    return toward(scene, neck, OPEN, neck[2] + 0.08, reach=0.01)


def cabinet_top(scene: Scene) -> np.ndarray:
    """5 cm from the middle of the cabinet's top toward the robot: the far side is at the edge of its reach."""
    return scene.pos(CABINET) + np.array([-0.054, 0.004, 0.222])


# Grasps: the bowl by its rim on the robot's side, 30 degrees toward +y (the hand, 20 cm wide along the
# fingers, then stays clear of the wine bottle's top and of the cabinet's handles), the cream cheese across its
# body, the wine bottle by its neck (the hand would hit its top lower down). Each is held once the fingers
# close to under the opening that goes with it: a bowl's rim and the bottle's neck are about a centimetre
# thick, the cream cheese 4.3 cm.
BOWL_RIM, CHEESE_BODY, BOTTLE_NECK = (-0.041, 0.0235, 0.03), (0, 0, 0.006), (0, 0, 0.12)
RIM_HELD, CHEESE_HELD, NECK_HELD = 0.005, 0.024, 0.009
# The wine rack's top shelf slopes up away from the robot's side at 31 degrees, a lip at its lower edge; a
# bottle lying along it, bottom against the lip, has its origin (its bottom) 6.7 cm from the rack's middle
# (clear of the post there), 7.3 cm in front of and 24.1 cm above the rack's origin. Held by the neck, the
# bottle lies so when the hand turns by RACK_TILT about x; its bottom then clears the rack's top (1.25 m) from
# a hand at RACK_TRAVEL_Z.
RACK_SLOT, RACK_TILT, RACK_TRAVEL_Z = np.array([0.067, 0.073, 0.241]), Rotation.from_euler("x", 1.0), 1.35

BOWL_ON_CABINET = PickPlace(BOWL, BOWL_RIM, cabinet_top, 0.015, 1.2, RIM_HELD, 0.05, AT_BOWL_RIM)
OPEN_TOP_DRAWER_THEN_BOWL_IN = open_drawer_then(
    "top", PickPlace(BOWL, BOWL_RIM, in_top_drawer, 0.015, 1.2, RIM_HELD, orientation=AT_BOWL_RIM))


def bowl_into_top_drawer(scene: Scene) -> Move:
    """The bowl first goes on top of the cabinet, out from under the opened drawer (which reaches over it on
    the table: a hand grasping it there would push the drawer shut), then the drawer opens and the bowl goes
    in. On top of the cabinet, wherever it came to rest, it stays out of the opening hand's way."""
    bowl = scene.pos(BOWL)
    top = cabinet_top(scene)
    on_top = abs(bowl[2] - top[2]) < 0.02 and np.linalg.norm(bowl[:2] - scene.pos(CABINET)[:2]) < 0.12
    if scene.joint(f"{CABINET}_top_level") > DRAWER_COUNTED_OPEN:
        if not on_top:
            return BOWL_ON_CABINET(scene)
        if np.linalg.norm(scene.eef[:2] - bowl[:2]) < 0.1 and scene.eef[2] < top[2] + 0.15:
            # Up, still pointing down, before turning to the handle: the fingers would sweep the bowl off.
            return Move(np.array([*scene.eef[:2], top[2] + 0.2]), OPEN, AT_BOWL_RIM)
    return OPEN_TOP_DRAWER_THEN_BOWL_IN(scene)


EXPERTS: dict[str, Callable[[Scene], Move]] = {
    "turn-on-the-stove": turn_on_stove,
    "open-the-middle-drawer-of-the-cabinet": open_drawer("middle"),
    "put-the-bowl-on-the-plate": PickPlace(BOWL, BOWL_RIM, lambda scene: scene.pos(PLATE), 0.02, 1.05, RIM_HELD,
                                           orientation=AT_BOWL_RIM),
    "put-the-bowl-on-the-stove": PickPlace(BOWL, BOWL_RIM, burner, 0.04, 1.05, RIM_HELD, 0.04, AT_BOWL_RIM),
    "put-the-bowl-on-top-of-the-cabinet": BOWL_ON_CABINET,
    "put-the-cream-cheese-in-the-bowl": PickPlace(CHEESE, CHEESE_BODY, lambda scene: scene.pos(BOWL), 0.045, 1.05,
                                                  CHEESE_HELD),
    "push-the-plate-to-the-front-of-the-stove": push_plate,
    "open-the-top-drawer-and-put-the-bowl-inside": bowl_into_top_drawer,
    "put-the-wine-bottle-on-the-rack": bottle_on_rack,
    "put-the-wine-bottle-on-top-of-the-cabinet": PickPlace(BOTTLE, BOTTLE_NECK, cabinet_top, 0.015, 1.3, NECK_HELD,
                                                           0.05),
}
