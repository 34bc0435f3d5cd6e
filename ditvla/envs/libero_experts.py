"""Scripted experts for LIBERO, from privileged simulator state (as robosuite's are).

An expert reads the task's BDDL goal (``parsed_problem["goal_state"]``, a list of
predicates) and works through it one predicate at a time, moving on when LIBERO says the
predicate holds; so the two-part goals of LIBERO-10 compose from the same parts.

Covered: ``In(object, region)`` and ``On(object, target)`` where the region or target
is an object (the basket, a plate, a bowl), a fixture's surface (the stove, the top of
the cabinet, the wine rack) or a region of the table; ``Open`` of the wooden cabinet's
drawers (grasping the handle with the hand pitched toward the cabinet, then pulling);
``In(object, a drawer)`` (the drawer opened first, and a bowl it would hang over dragged
out from under it before that); ``TurnOn`` of the flat stove (pushing its knob's ridge
round). Not covered, refused by name when the expert is first asked for an action:
closing things, turning things off, the microwave.

Geometry comes from the simulator each step: an object's world box is the box around its
collision geoms (:func:`geoms_box`), so tall bottles are grasped by the neck, wide bowls
by the rim, and a target's top is where its collision geometry ends. Actions are
OSC_POSE position deltas (1.0 = a 5 cm goal offset), proportional on the hand's error,
with the orientation left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ditvla.errors import ConfigError

OPEN, CLOSED = -1.0, 1.0
ACTION_DIM = 7
# MuJoCo geom types whose extents are known from their sizes.
_SPHERE, _CYLINDER, _BOX = 2, 5, 6

Target = Callable[[], tuple[np.ndarray, float]]  # () -> (centre (3,), top z)
GAIN = 25.0  # position action per metre of error (1.0 = a 5 cm goal offset)
NECK = 0.035  # a tall object is grasped this far below its top (a bottle by its neck)


def move_towards(hand: np.ndarray, goal: np.ndarray, gripper: float) -> np.ndarray:
    """The action that moves the hand from ``hand`` towards ``goal`` (proportional on
    the error, no turn) with the gripper at ``gripper`` (-1 open, +1 closed)."""
    action = np.zeros(ACTION_DIM, np.float32)
    action[:3] = np.clip((goal - hand) * GAIN, -1.0, 1.0)
    action[6] = gripper
    return action


def body_geoms(model: Any, body_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The collision geoms of body ``body_id`` and the bodies under it, and each one's
    half extents (G, 3) in its own frame (boxes exact; cylinders, capsules and meshes by
    their bounding sizes)."""
    geoms, extents = [], []
    for geom in range(model.ngeom):
        if model.geom_contype[geom] == 0 and model.geom_conaffinity[geom] == 0:
            continue  # visual only
        body = model.geom_bodyid[geom]
        while body not in (0, body_id):
            body = model.body_parentid[body]
        if body != body_id:
            continue
        size, kind = model.geom_size[geom], model.geom_type[geom]
        if kind == _SPHERE:
            local = np.full(3, size[0])
        elif kind == _BOX:
            local = np.asarray(size[:3])
        elif kind == _CYLINDER:
            local = np.array([size[0], size[0], size[1]])
        else:
            local = np.array([size[0], size[0], size[1] or size[0]])
        geoms.append(geom)
        extents.append(local)
    if not geoms:
        raise ConfigError(f"body {model.body_id2name(body_id)!r} has no collision geometry")
    return np.array(geoms), np.array(extents, np.float64)


def _world_boxes(sim: Any, geoms: np.ndarray, extents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``geoms``' world axis-aligned box as it is now: centres and half extents."""
    rotations = np.abs(sim.data.geom_xmat[geoms].reshape(-1, 3, 3))
    return sim.data.geom_xpos[geoms], np.einsum("gij,gj->gi", rotations, extents)


def geoms_box(sim: Any, geoms: np.ndarray, extents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World axis-aligned box (low, high corners) around ``geoms`` as they are now."""
    centres, half = _world_boxes(sim, geoms, extents)
    return (centres - half).min(axis=0), (centres + half).max(axis=0)


def _boxes_within(
    sim: Any, geoms: np.ndarray, extents: np.ndarray, low: np.ndarray, high: np.ndarray, margin
) -> np.ndarray:
    """Which of ``geoms`` (half extents ``extents``) have world boxes that come within
    ``margin`` of the box (``low``, ``high``): a cheap first cut before :func:`clearance`."""
    centres, half = _world_boxes(sim, geoms, extents)
    return np.all((centres - half < high + margin) & (centres + half > low - margin), axis=1)


def clearance(sim: Any, points: np.ndarray, geoms: np.ndarray, extents: np.ndarray) -> float:
    """The least distance from ``points`` (N, 3) to the boxes of ``geoms`` as they are now
    (each in its own frame, half extents ``extents``); negative when a point is inside."""
    rotations = sim.data.geom_xmat[geoms].reshape(-1, 3, 3)
    offsets = points[:, None, :] - sim.data.geom_xpos[geoms][None]
    outside = np.abs(np.einsum("gji,pgj->pgi", rotations, offsets)) - extents[None]
    distance = np.linalg.norm(np.maximum(outside, 0.0), axis=-1)
    return float((distance + np.minimum(outside.max(axis=-1), 0.0)).min())


class RimGrasp:
    """Where around a wide object's rim to grasp it, so that the open fingers and the hand
    clear everything else (a drawer's walls, a drawer above): the rim points every 30
    degrees, the fingers closing across the rim there (the hand turned about the vertical
    by at most ``MAX_TURN``, 60 degrees); the first one, on the far side along the fingers'
    axis as the hand starts, unless it is blocked; else the one with the most room, unless
    that lies beyond ``REACH`` from the robot's base (a bowl in an open drawer lies at the
    edge of the arm's reach, and its far side can be out of it): then the unblocked one
    nearest the base."""

    DIRECTIONS = 12
    INSET = 0.012  # the fingers close this far inside the box's edge (on the rim's wall)
    FINGER = (0.045, 0.008)  # an open finger's distance from the hand's axis; its room
    HAND = (0.10, 0.032)  # the hand's half length (along the fingers' axis), half width
    HAND_HEIGHTS = (0.06, 0.11)  # above the grasp point
    MAX_TURN = np.pi / 3  # the wrist's last joint runs out of range a quarter turn on
    # from the base (x, y): the hover 8 cm above a rim point 0.81 m away stalled short of
    # it (libero_spatial/4, init state 13); one 0.80 m away was reached
    REACH = 0.80

    def __init__(
        self,
        sim: Any,
        obstacles: tuple[np.ndarray, np.ndarray] | None,
        base: np.ndarray | None = None,
    ):
        """``obstacles``: the geoms to keep clear of and their half extents (None: grasp
        on the far side); ``base``: where the robot's base stands (world x, y, ...)."""
        self.sim, self.obstacles = sim, obstacles
        self.base = None if base is None else np.array(base, np.float64)[:2]

    def room(self, point: np.ndarray, direction: np.ndarray) -> float:
        """How far the fingers and the hand, grasping at ``point`` across ``direction``,
        keep from the obstacles beyond the room each needs (negative: they hit)."""
        reach, finger_room = self.FINGER
        up = np.array([0.0, 0.0, 1.0])
        fingers = [
            point + side * reach * direction + up * dz for side in (-1, 1) for dz in (0, 0.03)
        ]
        half_length, half_width = self.HAND
        hand = [
            point + along * direction + up * dz
            for along in np.linspace(-half_length, half_length, 9)
            for dz in self.HAND_HEIGHTS
        ]
        return min(
            clearance(self.sim, np.array(fingers), *self.obstacles) - finger_room,
            clearance(self.sim, np.array(hand), *self.obstacles) - half_width,
        )

    @classmethod
    def point(cls, low: np.ndarray, high: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """The grasp point on the rim of the object in box (``low``, ``high``), from its
        middle along ``direction``: on the rim's wall, 2 cm below its top."""
        half = (high - low) / 2
        radius = 1.0 / np.hypot(direction[0] / half[0], direction[1] / half[1])  # an ellipse's
        point = (low + high) / 2 + direction * (radius - cls.INSET)
        point[2] = high[2] - 0.02
        return point

    def choose(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, float]:
        """The direction (3,) from the object's middle to the rim point to grasp, and the
        turn about the vertical (radians) that brings the fingers' axis onto it."""
        candidates = []  # (direction, angle, room, distance from the base)
        for k in range(self.DIRECTIONS):
            angle = np.pi / 2 + 2 * np.pi * k / self.DIRECTIONS
            if abs(angle % np.pi - np.pi / 2) > self.MAX_TURN:
                continue
            direction = np.array([np.cos(angle), np.sin(angle), 0.0])
            if self.obstacles is None:
                return direction, 0.0
            point = self.point(low, high, direction)
            room = self.room(point, direction)
            if room >= 0 and k == 0:
                return direction, 0.0
            distance = 0.0 if self.base is None else np.linalg.norm(point[:2] - self.base)
            candidates.append((direction, angle, room, distance))
        best = max(candidates, key=lambda c: c[2])
        unblocked = [c for c in candidates if c[2] >= 0]
        if best[3] > self.REACH and unblocked:
            best = min(unblocked, key=lambda c: c[3])
        direction, angle = best[:2]
        turn = angle % np.pi - np.pi / 2  # from the +y axis, within a quarter turn either way
        return direction, float(turn)


def middle_grasp(low: np.ndarray, high: np.ndarray, neck: float = NECK) -> np.ndarray:
    """Where an object narrow enough to straddle is grasped, from its box (low, high):
    the middle of the box, or ``neck`` below its top if that is higher (a bottle's neck)."""
    centre = (low + high) / 2
    return np.array([centre[0], centre[1], max(centre[2], high[2] - neck)])


class PickAndPlace:
    """Grasp one object and put it down on or into a target.

    Phases: hover above the grasp point, descend (until there, or stalled against
    something), close, lift, carry above the target, lower until the object's bottom is
    ``release_above`` over the target's top, open, back off up. An object that leaves the
    hand on the way is grasped again. Grasp point: the middle of the object's box; for a
    tall object ``neck`` below its top; for one too wide to straddle (a bowl, a plate),
    on its rim, at a point :class:`RimGrasp` chooses (the hand turned to it if need be).
    """

    HOVER = 0.08
    CLOSE_STEPS = 10
    OPEN_STEPS = 8
    LIFT = 0.10  # at least this far up from where it was grasped, before carrying
    WIDE = 0.07  # wider than this (in x and y) is grasped by the rim
    DROPPED = 0.04  # the object this far from where the hand holds it: it fell out
    SPACING = 0.03  # the carry's way is checked for room at points this far apart
    CLIMB, CLIMB_STEP = 0.16, 0.02  # the most a carry rises above its usual height to
    # clear the way, and the steps it tries

    def __init__(
        self,
        sim: Any,
        body_id: int,
        target: Target,
        release_above: float = 0.05,
        neck=NECK,
        rim: RimGrasp | None = None,
        hand_orientation: Callable[[], np.ndarray] | None = None,
    ):
        """``rim`` chooses where around a wide object's rim to grasp it (else on the far
        side along the fingers' axis); ``hand_orientation``: () -> the hand's orientation
        (x, y, z, w), needed when ``rim`` may turn the hand."""
        self.sim, self.target = sim, target
        self.geoms = body_geoms(sim.model, body_id)
        self.release_above, self.neck = release_above, neck
        self.rim, self.hand_orientation = rim or RimGrasp(sim, None), hand_orientation
        self.rim_direction: np.ndarray | None = None  # chosen for this attempt
        self.turned_to: np.ndarray | None = None  # the hand's orientation to hold (3x3)
        self.phase, self.counter, self.last_z = "hover", 0, None
        self.hold: np.ndarray | None = None  # hand minus grasp point, as grasped
        self.lift_z = -np.inf
        self.last_centre: np.ndarray | None = None  # the object's, at the last action
        self.moved = np.inf  # how far the object moved since the last action

    def try_again(self) -> None:
        """Start over from the object where it now is (its goal did not hold)."""
        self.phase, self.counter, self.last_z, self.hold = "hover", 0, None, None
        self.lift_z, self.rim_direction = -np.inf, None

    def grasp_point(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where to grasp the object now, and its box (low, high)."""
        low, high = geoms_box(self.sim, *self.geoms)
        if min(high[0] - low[0], high[1] - low[1]) <= self.WIDE:
            return middle_grasp(low, high, self.neck), low, high
        if self.rim_direction is None:
            self.rim_direction, turn = self.rim.choose(low, high)
            self.turned_to = None
            if turn != 0.0:
                start = _transforms().quat2mat(self.hand_orientation())
                self.turned_to = _rotation(np.array([0.0, 0.0, 1.0]), turn) @ start
        return RimGrasp.point(low, high, self.rim_direction), low, high

    def clear_at(
        self, low: np.ndarray, high: np.ndarray, bottom: float, towards: np.ndarray | None = None
    ) -> bool:
        """Whether the object, held as it is, would clear everything else (by 1 cm) with
        its bottom at ``bottom`` (a drawer it came out of is behind it), where it is and,
        given ``towards`` (x, y, ...), all the way from there to its middle over that point
        (a cabinet between a drawer and the plate). Its box's bottom and top are checked
        at points ``SPACING`` apart, and the way at steps of ``SPACING``, so that nothing
        wider than that passes between them."""
        if self.rim.obstacles is None:
            return True
        xs, ys = (
            np.linspace(low[axis], high[axis], int(np.ceil((high - low)[axis] / self.SPACING)) + 1)
            for axis in (0, 1)
        )
        faces = np.array([[x, y, z] for x in xs for y in ys
                          for z in (bottom, bottom + high[2] - low[2])])  # fmt: skip
        shifts = [np.zeros(3)]
        if towards is not None:
            way = np.append(np.asarray(towards)[:2] - (low + high)[:2] / 2, 0.0)
            steps = int(np.ceil(np.linalg.norm(way) / self.SPACING)) + 1
            shifts = [way * k for k in np.linspace(0.0, 1.0, steps)]
        points = np.concatenate([faces + shift for shift in shifts])
        geoms, extents = self.rim.obstacles
        near = _boxes_within(self.sim, geoms, extents, points.min(0), points.max(0), 0.01)
        return not near.any() or clearance(self.sim, points, geoms[near], extents[near]) > 0.01

    def carry_height(
        self, low: np.ndarray, high: np.ndarray, below_hand: float, hand_z: float, towards
    ) -> float:
        """The lowest hand height from ``hand_z`` up, in ``CLIMB_STEP`` steps up to
        ``CLIMB`` more, at which the held object clears everything on its way to
        ``towards``; ``hand_z`` itself when none does (rising would not help: the way's
        end is blocked). ``below_hand``: how far the object's bottom is below the hand."""
        for rise in np.arange(0.0, self.CLIMB + 1e-9, self.CLIMB_STEP):
            if self.clear_at(low, high, hand_z + rise - below_hand, towards):
                return hand_z + rise
        return hand_z

    def turned(self) -> bool:
        """Whether the hand is turned as the chosen grasp needs (or need not turn)."""
        if self.turned_to is None:
            return True
        return np.linalg.norm(_rotation_error(self.turned_to, self.hand_orientation())) < 0.08

    def action(self, hand: np.ndarray) -> np.ndarray:
        """The action for the hand (end-effector) position ``hand``; the hand held turned
        as the chosen grasp needs, if it does."""
        action = self.translation(hand)
        if self.turned_to is not None:
            error = _rotation_error(self.turned_to, self.hand_orientation())
            action[3:6] = np.clip(error * PullDrawer.ROTATION_GAIN, -1.0, 1.0)
        return action

    def translation(self, hand: np.ndarray) -> np.ndarray:
        """The action for the hand position ``hand``, its turn left at zero."""
        grasp, low, high = self.grasp_point()
        centre = (low + high) / 2
        self.moved = (
            np.inf if self.last_centre is None else np.linalg.norm(centre - self.last_centre)
        )
        self.last_centre = centre
        held = self.phase in ("lift", "carry", "lower") and self.hold is not None
        if held and np.linalg.norm(hand - self.hold - grasp) > self.DROPPED:
            self.phase, self.hold, self.rim_direction = "rise", None, None
        if self.phase == "rise":  # up and open, then grasp again
            if hand[2] > high[2] + self.HOVER - 0.02:
                self.phase = "hover"
            return move_towards(hand, np.array([hand[0], hand[1], high[2] + self.HOVER]), OPEN)
        if self.phase == "hover":
            goal = np.array([grasp[0], grasp[1], high[2] + self.HOVER])
            near = np.linalg.norm((goal - hand)[:2]) < 0.008 and abs(goal[2] - hand[2]) < 0.03
            if near and self.turned():
                self.phase, self.counter, self.last_z = "descend", 0, None
            return move_towards(hand, goal, OPEN)
        if self.phase == "descend":
            stalled = self.last_z is not None and abs(self.last_z - hand[2]) < 0.001
            self.counter = self.counter + 1 if stalled else 0
            self.last_z = hand[2]
            if np.linalg.norm(grasp - hand) < 0.01 or self.counter >= 5:
                self.phase, self.counter = "close", 0
            return move_towards(hand, grasp, OPEN)
        if self.phase == "close":
            self.counter += 1
            if self.counter >= self.CLOSE_STEPS:
                self.phase, self.hold, self.lift_z = "lift", hand - grasp, hand[2] + self.LIFT
            return move_towards(hand, hand, CLOSED)
        centre, top = self.target()
        height = grasp[2] - low[2]  # from the object's bottom up to where it is held
        carry_z = top + self.release_above + height + 0.05
        below_hand = hand[2] - low[2]  # as held (a grasp that stalled holds it lower)
        if self.phase == "lift" or not self.clear_at(low, high, carry_z - below_hand, centre):
            carry_z = self.carry_height(low, high, below_hand, max(carry_z, self.lift_z), centre)
        offset = hand - (low + high) / 2  # the object's middle (not the rim) over the target's
        over_target = np.array([centre[0] + offset[0], centre[1] + offset[1], carry_z])
        if self.phase == "lift":
            if hand[2] > carry_z - 0.02:
                self.phase = "carry"
            return move_towards(hand, np.array([hand[0], hand[1], carry_z]), CLOSED)
        if self.phase == "carry":
            if np.linalg.norm((over_target - hand)[:2]) < 0.01:
                self.phase = "lower"
            return move_towards(hand, over_target, CLOSED)
        if self.phase == "lower":
            release_z = top + self.release_above
            if low[2] - release_z < 0.01:
                self.phase, self.counter = "release", 0
            over_target[2] = hand[2] + release_z - low[2]
            return move_towards(hand, over_target, CLOSED)
        if self.phase == "release":
            self.counter += 1
            if self.counter >= self.OPEN_STEPS:
                self.phase, self.counter = "retreat", 0
            return move_towards(hand, hand, OPEN)
        self.counter += 1
        return move_towards(hand, hand + np.array([0.0, 0.0, 0.05]), OPEN)


# Handle bars of the wooden cabinet's drawers, in each drawer body's frame (LIBERO's
# wooden_cabinet.xml); a drawer opens along the body's -y axis.
CABINET_HANDLES = {
    "top": np.array([-0.00278, -0.10161, 0.18393]),
    "middle": np.array([-0.00278, -0.10161, 0.11041]),
    "bottom": np.array([-0.00278, -0.10161, 0.04114]),
}
DRAWER_OPEN = -0.155  # the slide joint's position to pull to (open below -0.14)
KNOB_ON = 0.6  # the stove knob's angle to push to (on from 0.5 rad)


def _transforms() -> Any:
    """robosuite's rotation helpers (imported when an expert first turns the hand)."""
    from robosuite.utils import transform_utils

    return transform_utils


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """The rotation matrix of ``angle`` radians about ``axis``."""
    axis = axis / np.linalg.norm(axis)
    return _transforms().quat2mat(_transforms().axisangle2quat(axis * angle))


def _rotation_error(target: np.ndarray, quat: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) that turns the hand's orientation ``quat`` (x, y, z, w, robosuite's
    order) into ``target`` (3x3), in the world frame."""
    current = _transforms().quat2mat(quat)
    return _transforms().quat2axisangle(_transforms().mat2quat(target @ current.T))


class PullDrawer:
    """Open a drawer of the wooden cabinet: pitch the hand a quarter turn to point at the
    cabinet (the closed fingers then grip the horizontal bar from above and below; a
    downward hand would hit the drawer above with its palm), stop above the point in front
    of the handle, come down to it, move in, close, pull until the drawer is open, let go,
    and back off turning the hand down again.

    The pitched hand reaches 10 cm below its axis, below a bowl's rim at the middle
    drawer's handle: travelling there level swept bowls and plates along into the handle's
    way, so it travels ``ABOVE`` the handle and comes straight down in front of it."""

    ROTATION_GAIN = 3.0  # action per radian of error (1 = 0.5 rad)
    CLOSE_STEPS = 10
    OPEN_STEPS = 8
    FRONT = 0.12  # stop this far in front of the handle first
    ABOVE = 0.08  # and before that this far above that point
    # hold the hand this far above the bar's middle: the pitched hand's lower edge, 10 cm
    # below its axis, then clears a plate's rim in front of the middle drawer (it pressed
    # on it, and coming in dragged the plate against the cabinet)
    RAISE = 0.006
    TRIES = 40  # steps moving in before backing out to try again

    def __init__(self, sim: Any, body: str, joint: str, handle: np.ndarray, quat: Callable):
        self.sim, self.body, self.joint, self.local = sim, body, joint, handle
        self.quat = quat  # () -> the hand's orientation (x, y, z, w)
        self.phase, self.counter = "above", 0
        self.target_rotation: np.ndarray | None = None
        self.start_rotation: np.ndarray | None = None
        self.back_from: np.ndarray | None = None

    def handle(self) -> tuple[np.ndarray, np.ndarray]:
        """The handle's world position and the direction that opens the drawer."""
        rotation = self.sim.data.get_body_xmat(self.body)
        return self.sim.data.get_body_xpos(self.body) + rotation @ self.local, -rotation[:, 1]

    def _move(self, hand: np.ndarray, goal: np.ndarray, gripper: float) -> np.ndarray:
        action = move_towards(hand, goal, gripper)
        error = _rotation_error(self.target_rotation, self.quat())
        action[3:6] = np.clip(error * self.ROTATION_GAIN, -1.0, 1.0)
        return action

    def action(self, hand: np.ndarray) -> np.ndarray:
        bar, pull = self.handle()
        grip = bar + np.array([0.0, 0.0, self.RAISE])  # where the hand holds the bar
        if self.target_rotation is None:  # pointing down -> pointing into the cabinet
            axis = np.cross(np.array([0.0, 0.0, -1.0]), -pull)
            self.start_rotation = _transforms().quat2mat(self.quat())
            self.target_rotation = _rotation(axis, np.pi / 2) @ self.start_rotation
        turned = np.linalg.norm(_rotation_error(self.target_rotation, self.quat())) < 0.08
        if self.phase == "above":
            goal = grip + pull * self.FRONT + np.array([0.0, 0.0, self.ABOVE])
            if np.linalg.norm(goal - hand) < 0.02 and turned:
                self.phase = "front"
            return self._move(hand, goal, OPEN)
        if self.phase == "front":
            goal = grip + pull * self.FRONT
            if np.linalg.norm(goal - hand) < 0.01 and turned:
                self.phase, self.counter = "in", 0
            return self._move(hand, goal, OPEN)
        if self.phase == "in":
            self.counter += 1
            if np.linalg.norm(grip - hand) < 0.01:
                self.phase, self.counter = "close", 0
            elif self.counter > self.TRIES:
                self.phase = "front"
            along = max(float((hand - grip) @ pull) - 0.03, 0.0)
            return self._move(hand, grip + pull * along, OPEN)
        if self.phase == "close":
            self.counter += 1
            if self.counter >= self.CLOSE_STEPS:
                self.phase = "pull"
            return self._move(hand, grip, CLOSED)
        if self.phase == "pull":
            if self.sim.data.get_joint_qpos(self.joint) < DRAWER_OPEN:
                self.phase, self.counter = "release", 0
            return self._move(hand, grip + pull * 0.05, CLOSED)
        if self.phase == "release":
            self.counter += 1
            if self.counter >= self.OPEN_STEPS:
                self.phase, self.back_from = "back", hand.copy()
                self.target_rotation = self.start_rotation
            return self._move(hand, hand, OPEN)
        # back off and up while turning the hand down again; then it is done
        goal = self.back_from + pull * 0.08 + np.array([0.0, 0.0, 0.06])
        if self.phase == "back" and turned and np.linalg.norm(goal - hand) < 0.02:
            self.phase = "retreat"
        return self._move(hand, goal, OPEN)


class DragClear:
    """Before a drawer is opened, drag a bowl that the open drawer would hang over out from
    under it: the closed fingers come down inside the bowl by its wall on the side the
    drawer opens towards, and pull it along that way until its near edge will clear the
    open drawer's front by ``MARGIN``; then the hand rises. (With the drawer open, no rim
    grasp kept the hand clear of it: the hand is 20 cm long along the fingers' axis and
    reached under the drawer, or hit its corner coming down.)"""

    HOVER = 0.08
    HOOK_IN = 0.025  # the fingers this far inside the bowl's box, by its wall
    HOOK_UP = 0.025  # the hand this far above the bowl's bottom while dragging
    MARGIN = 0.04  # beyond the open drawer's front, room for the hand grasping the rim

    def __init__(self, sim: Any, geoms: tuple[np.ndarray, np.ndarray], drawer: PullDrawer):
        self.sim, self.geoms = sim, geoms
        self.drawer_geoms = body_geoms(sim.model, sim.model.body_name2id(drawer.body))
        _, self.pull = drawer.handle()
        self.joint, self.drawer_body = drawer.joint, drawer.body
        self.phase, self.counter, self.last = "hover", 0, None
        self.hook: np.ndarray | None = None  # where the fingers drag from

    def needed(self) -> float:
        """How far the bowl must still move along the pull for its near edge to clear the
        open drawer's front by ``MARGIN`` (0 when it does, or lies beside the drawer)."""
        low, high = geoms_box(self.sim, *self.geoms)
        drawer_low, drawer_high = geoms_box(self.sim, *self.drawer_geoms)
        side = np.array([-self.pull[1], self.pull[0], 0.0])  # across the pull, level
        if not _overlap(low, high, drawer_low, drawer_high, side, margin=0.03):
            return 0.0
        opened = -self.sim.data.get_joint_qpos(self.joint)  # how far it is open already
        front = _extent(drawer_low, drawer_high, self.pull)[1] - DRAWER_OPEN - opened
        return max(front + self.MARGIN - _extent(low, high, self.pull)[0], 0.0)

    def action(self, hand: np.ndarray) -> np.ndarray:
        low, high = geoms_box(self.sim, *self.geoms)
        if self.hook is None:
            centre = (low + high) / 2
            far = _extent(low, high, self.pull)[1] - centre @ self.pull - self.HOOK_IN
            self.hook = centre + self.pull * far
            self.hook[2] = low[2] + self.HOOK_UP
        above = np.array([self.hook[0], self.hook[1], high[2] + self.HOVER])
        if self.phase == "hover":
            if np.linalg.norm(above - hand) < 0.01:
                self.phase = "descend"
            return move_towards(hand, above, CLOSED)
        stalled = self.last is not None and np.linalg.norm(hand - self.last) < 0.001
        self.counter, self.last = (self.counter + 1 if stalled else 0), hand.copy()
        if self.phase == "descend":
            if np.linalg.norm(self.hook - hand) < 0.01 or self.counter >= 5:
                self.phase, self.counter = "drag", 0
                self.hook = hand.copy()
            return move_towards(hand, self.hook, CLOSED)
        if self.phase == "drag":
            if self.needed() <= 0.0 or self.counter >= 5:
                self.phase = "rise"
            return move_towards(hand, hand + self.pull * 0.04, CLOSED)
        if self.phase == "rise" and hand[2] > high[2] + self.HOVER - 0.02:
            self.phase = "retreat"
        return move_towards(hand, np.array([hand[0], hand[1], high[2] + self.HOVER]), CLOSED)


def _extent(low: np.ndarray, high: np.ndarray, axis: np.ndarray) -> tuple[float, float]:
    """The least and greatest of the box (``low``, ``high``) along the level ``axis``."""
    corners = np.array([[x, y] for x in (low[0], high[0]) for y in (low[1], high[1])])
    along = corners @ axis[:2]
    return float(along.min()), float(along.max())


def _overlap(low, high, other_low, other_high, axis: np.ndarray, margin: float) -> bool:
    """Whether two boxes overlap along the level ``axis``, within ``margin``."""
    a, b = _extent(low, high, axis), _extent(other_low, other_high, axis)
    return a[0] < b[1] + margin and b[0] < a[1] + margin


class TurnKnob:
    """Turn the flat stove on: the closed hand comes down beside one end of the knob's
    ridge and pushes it round (counter-clockwise seen from above) past ``KNOB_ON``."""

    HOVER = 0.06

    def __init__(self, sim: Any, body: str, joint: str):
        self.sim, self.body, self.joint = sim, body, joint
        self.phase = "hover"

    def action(self, hand: np.ndarray) -> np.ndarray:
        knob = self.sim.data.get_body_xpos(self.body)
        start = knob + np.array([0.04, -0.035, 0.03])  # beside the ridge's +x end
        end = knob + np.array([0.0, 0.06, 0.03])
        if self.phase == "hover":
            goal = start + np.array([0.0, 0.0, self.HOVER])
            if np.linalg.norm(goal - hand) < 0.01:
                self.phase = "descend"
            return move_towards(hand, goal, CLOSED)
        if self.phase == "descend":
            if np.linalg.norm(start - hand) < 0.008:
                self.phase = "push"
            return move_towards(hand, start, CLOSED)
        if self.phase == "push":
            if self.sim.data.get_joint_qpos(self.joint) > KNOB_ON:
                self.phase = "retreat"
            return move_towards(hand, end, CLOSED)
        return move_towards(hand, hand + np.array([0.0, 0.0, 0.05]), CLOSED)


Part = PickAndPlace | PullDrawer | TurnKnob | DragClear


class LiberoExpert:
    """The expert of one LIBERO episode: its goal's predicates in order, each done by one
    or more parts (a drawer is opened before something is put in it). A part hands over
    to the next once its own check holds and it has let go (its ``retreat`` phase)."""

    def __init__(self, domain: Any, hand_orientation: Callable[[], np.ndarray]):
        """``domain``: LIBERO's task environment (``OffScreenRenderEnv(...).env``), just
        reset to the episode's start; ``hand_orientation``: () -> the hand's current
        orientation quaternion (x, y, z, w)."""
        self.domain, self.hand_orientation = domain, hand_orientation
        self.steps: list[tuple[Part, Callable[[], bool]]] = []
        for predicate in domain.parsed_problem["goal_state"]:
            self.steps += self._steps(list(predicate))  # refuses what it cannot do
        self._drag_before_opening()
        self._open_each_drawer_once()
        self.current = 0

    def _drag_before_opening(self) -> None:
        """Move each bowl's drag before the first opening of its drawer: a goal that opens
        the drawer and then puts the bowl in it (Open, then In) opens it in its own step."""
        for index, (part, _) in enumerate(list(self.steps)):
            if not isinstance(part, DragClear):
                continue
            for earlier, (other, _) in enumerate(self.steps[:index]):
                if isinstance(other, PullDrawer) and other.body == part.drawer_body:
                    self.steps.insert(earlier, self.steps.pop(index))
                    break

    def _open_each_drawer_once(self) -> None:
        """Drop a drawer's opening when an earlier step opens it: a goal that opens the
        drawer and then puts something in it (Open, then In) asks for it twice, and a
        second opening grips the open drawer's handle and pulls again for nothing."""
        opened: set[str] = set()
        steps = []
        for part, done in self.steps:
            if isinstance(part, PullDrawer):
                if part.body in opened:
                    continue
                opened.add(part.body)
            steps.append((part, done))
        self.steps = steps

    def _holds(self, predicate: list[str]) -> Callable[[], bool]:
        return lambda: bool(self.domain._eval_predicate(predicate))

    def _steps(self, predicate: list[str]) -> list[tuple[Part, Callable[[], bool]]]:
        domain, name = self.domain, predicate[0].lower()
        holds = self._holds(predicate)
        if name in ("in", "on") and len(predicate) == 3 and predicate[1] in domain.objects_dict:
            _, moved, where = predicate
            base = domain.sim.data.get_body_xpos(domain.robots[0].robot_model.root_body)
            rim = RimGrasp(domain.sim, self._obstacles(moved), base)
            place = PickAndPlace(
                domain.sim,
                domain.obj_body_id[moved],
                self._target(where),
                rim=rim,
                hand_orientation=self.hand_orientation,
            )
            drawer = self._drawer(where)
            if drawer is None:
                return [(place, holds)]
            opened = self._holds(["open", where])
            steps = [(drawer, opened), (place, holds)]
            low, high = geoms_box(domain.sim, *place.geoms)
            drag = DragClear(domain.sim, place.geoms, drawer)
            if min((high - low)[:2]) > PickAndPlace.WIDE and drag.needed() > 0.0:  # a bowl
                steps.insert(0, (drag, lambda: True))
            return steps
        if name == "open" and len(predicate) == 2 and (drawer := self._drawer(predicate[1])):
            return [(drawer, holds)]
        if name == "turnon" and len(predicate) == 2:
            stove = domain.fixtures_dict.get(predicate[1])
            if stove is not None and type(stove).__name__ == "FlatStove":
                joint = stove.joints[0]
                return [(TurnKnob(domain.sim, f"{predicate[1]}_button", joint), holds)]
        raise ConfigError(
            f"no scripted expert for the LIBERO goal ({' '.join(predicate)}); experts cover "
            "putting an object in or on another object, a fixture's surface, a table region "
            "or a drawer, opening the wooden cabinet's drawers and turning the flat stove "
            "on (not closing, turning off, or the microwave)"
        )

    def _obstacles(self, moved: str) -> tuple[np.ndarray, np.ndarray]:
        """The collision geoms of every object and fixture but ``moved``, and their half
        extents."""
        model, bodies = self.domain.sim.model, self.domain.obj_body_id
        parts = [body_geoms(model, body) for name, body in bodies.items() if name != moved]
        return np.concatenate([g for g, _ in parts]), np.concatenate([e for _, e in parts])

    def _drawer(self, where: str) -> PullDrawer | None:
        """The part that opens ``where`` when it is a drawer of the wooden cabinet."""
        site = self.domain.object_sites_dict.get(where)
        joints = list(getattr(site, "joints", None) or [])
        fixture = self.domain.fixtures_dict.get(getattr(site, "parent_name", None))
        if not joints or type(fixture).__name__ != "WoodenCabinet":
            return None
        prefix = f"{site.parent_name}_"
        level = joints[0].removeprefix(prefix).removesuffix("_level")
        if level not in CABINET_HANDLES:
            return None
        body = f"{prefix}cabinet_{level}"
        return PullDrawer(
            self.domain.sim, body, joints[0], CABINET_HANDLES[level], self.hand_orientation
        )

    def _target(self, where: str) -> Target:
        """Where ``where`` (an object, an object's contain region, a fixture's site or a
        table region) is now: (centre, top z)."""
        domain, sim = self.domain, self.domain.sim
        owner = where.removesuffix("_contain_region")
        if owner in domain.objects_dict:
            geoms = body_geoms(sim.model, domain.obj_body_id[owner])

            def object_top() -> tuple[np.ndarray, float]:
                low, high = geoms_box(sim, *geoms)
                return (low + high) / 2, float(high[2])

            return object_top
        if where in domain.object_sites_dict:
            size = domain.object_sites_dict[where].size
            size = np.zeros(3) if size is None else np.asarray(size, np.float64)

            def site_top() -> tuple[np.ndarray, float]:
                centre = np.array(sim.data.get_site_xpos(where))
                vertical = np.abs(sim.data.get_site_xmat(where)[2]) @ size
                return centre, float(centre[2] + vertical)

            return site_top
        raise ConfigError(f"the LIBERO goal names {where!r}, which the scene does not hold")

    # steps of backing off after letting go before a placement whose goal does not hold
    # is started over, once the object has come to rest (moves under SETTLED per step)
    RETRY_AFTER = 15
    SETTLED = 0.0005

    def action(self, hand: np.ndarray) -> np.ndarray:
        """The action for the hand position ``hand``, from the current part. A placement
        whose goal does not hold once it has backed off and the object has come to rest
        (a bowl that slid off the plate) starts over."""
        while self.current < len(self.steps) - 1:
            part, done = self.steps[self.current]
            if part.phase != "retreat" or not done():
                break
            self.current += 1
        part, done = self.steps[self.current]
        if (
            isinstance(part, PickAndPlace)
            and part.phase == "retreat"
            and part.counter >= self.RETRY_AFTER
            and part.moved < self.SETTLED
            and not done()
        ):
            part.try_again()
        return part.action(hand)
