"""Random scene graphs of the toy world and the captions that describe them.

A scene is a camera over a textured ground plane under a sky, one to three objects standing on
the ground, and a directional light. The salient object is the object with the largest
visible area in the rendered image; the caption names it, with its colour, shape, horizontal
position in the image and distance from the camera, so the text carries the layout.
"""

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("sphere", "cube", "cylinder", "cone")

# Linear RGB in [0, 1]. The names are the caption's words.
COLORS = {
    "red": (0.85, 0.10, 0.08),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.00, 0.50, 0.05),
    "white": (0.92, 0.92, 0.92),
}

# Ground tones chosen so no ground is confused with an object colour.
GROUND_COLORS = (
    (0.55, 0.52, 0.48),
    (0.62, 0.55, 0.42),
    (0.42, 0.36, 0.30),
    (0.50, 0.50, 0.50),
)

# Horizontal field of view of the camera, in degrees.
FIELD_OF_VIEW = 50.0

# Distance bands along the camera's viewing axis, in world units, for the caption.
NEAR_LIMIT = 4.6
FAR_LIMIT = 6.6


@dataclass
class SceneObject:
    """One object standing on the ground plane."""

    shape: str
    color: str
    x: float  # world position of the base centre, y = 0 is the ground
    z: float
    size: float  # radius of sphere, cylinder and cone; half the edge of the cube
    height: float  # total height above the ground
    angle: float  # rotation about the vertical axis, radians (cubes only)
    rgb: tuple[float, float, float]


@dataclass
class Scene:
    """Everything needed to render one image deterministically."""

    seed: int
    objects: list[SceneObject]
    camera_height: float
    camera_pitch: float  # radians, positive looks down
    light_direction: tuple[float, float, float]  # unit vector towards the light
    ground_rgb: tuple[float, float, float]
    ground_tile: float
    ground_phase: tuple[float, float]
    sky_top: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    phrasing: int  # picks one caption template and synonyms, fixed per seed
    extras: dict = field(default_factory=dict)


def sample_scene(seed: int, max_objects: int = 3) -> Scene:
    """Draw a random scene from a seed; the same seed always gives the same scene."""
    rng = np.random.default_rng(seed)
    object_count = int(rng.integers(1, max_objects + 1))

    camera_height = float(rng.uniform(1.3, 2.0))
    camera_pitch = float(np.deg2rad(rng.uniform(12.0, 20.0)))
    half_tan = np.tan(np.deg2rad(FIELD_OF_VIEW) / 2.0)

    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < object_count and attempts < 50:
        attempts += 1
        is_main = not objects
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        z = float(rng.uniform(3.4, 8.2))
        lateral = float(rng.uniform(-0.8, 0.8))
        x = lateral * z * half_tan
        size = float(rng.uniform(0.5, 0.9) if is_main else rng.uniform(0.25, 0.5))
        if shape == "sphere":
            height = 2.0 * size
        elif shape == "cube":
            height = 2.0 * size
        else:
            height = float(size * rng.uniform(1.6, 2.6))
        angle = float(rng.uniform(0.0, np.pi / 2.0))
        jitter = rng.normal(0.0, 0.03, size=3)
        rgb = tuple(float(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0.0, 1.0))

        # Keep objects apart so none sits inside another.
        overlapping = any(
            np.hypot(x - other.x, z - other.z) < 1.5 * (size + other.size) for other in objects
        )
        if overlapping:
            continue
        objects.append(SceneObject(shape, color, x, z, size, height, angle, rgb))

    elevation = np.deg2rad(rng.uniform(35.0, 65.0))
    azimuth = rng.uniform(-np.pi, np.pi)
    light = np.array(
        [
            np.cos(elevation) * np.sin(azimuth),
            np.sin(elevation),
            np.cos(elevation) * np.cos(azimuth),
        ]
    )
    ground = np.array(GROUND_COLORS[int(rng.integers(len(GROUND_COLORS)))])
    ground = np.clip(ground + rng.normal(0.0, 0.03, size=3), 0.0, 1.0)
    sky_top = np.clip(np.array([0.25, 0.45, 0.85]) + rng.normal(0.0, 0.04, size=3), 0.0, 1.0)
    sky_horizon = np.clip(np.array([0.78, 0.85, 0.95]) + rng.normal(0.0, 0.03, size=3), 0.0, 1.0)

    return Scene(
        seed=seed,
        objects=objects,
        camera_height=camera_height,
        camera_pitch=camera_pitch,
        light_direction=tuple(float(v) for v in light),
        ground_rgb=tuple(float(v) for v in ground),
        ground_tile=float(rng.uniform(0.6, 1.2)),
        ground_phase=(float(rng.uniform(0.0, 2.0)), float(rng.uniform(0.0, 2.0))),
        sky_top=tuple(float(v) for v in sky_top),
        sky_horizon=tuple(float(v) for v in sky_horizon),
        phrasing=int(rng.integers(1_000_000)),
    )


SHAPE_WORDS = {
    "sphere": ("sphere", "ball"),
    "cube": ("cube", "box"),
    "cylinder": ("cylinder", "cylinder"),
    "cone": ("cone", "cone"),
}
SIDE_PHRASES = {
    "left": ("on the left", "to the left", "at the left side"),
    "centre": ("in the centre", "in the middle", "at the centre"),
    "right": ("on the right", "to the right", "at the right side"),
}
DISTANCE_PHRASES = {
    "near": ("close to the camera", "nearby", "up close"),
    "middle": ("at medium distance", "a little way off", "at middle distance"),
    "far": ("far away", "in the distance", "far from the camera"),
}
TEMPLATES = (
    "{article} {color} {shape} {side}, {distance}",
    "a photo of {article} {color} {shape} {side}, {distance}",
    "{distance}, {article} {color} {shape} {side}",
    "a render of {article} {color} {shape} {distance}, {side}",
)


def horizontal_position(mask: np.ndarray) -> str:
    """Name the image third ("left", "centre" or "right") that contains the mask's centroid."""
    columns = np.nonzero(mask)[1]
    if columns.size == 0:
        raise ValueError("The mask is empty, so it has no horizontal position.")
    fraction = (columns.mean() + 0.5) / mask.shape[1]
    if fraction < 1.0 / 3.0:
        return "left"
    if fraction > 2.0 / 3.0:
        return "right"
    return "centre"


def distance_band(obj: SceneObject, camera_pitch: float, camera_height: float) -> str:
    """Name the distance band of an object's centre along the camera's viewing axis."""
    centre_height = obj.height / 2.0 - camera_height
    depth = obj.z * np.cos(camera_pitch) - centre_height * np.sin(camera_pitch)
    if depth < NEAR_LIMIT:
        return "near"
    if depth > FAR_LIMIT:
        return "far"
    return "middle"


def compose_caption(color: str, shape: str, side: str, distance: str, phrasing: int = 0) -> str:
    """Build a caption from attribute words; phrasing picks the template and synonyms."""
    rng = np.random.default_rng(phrasing)
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(
        article="an" if color[0] in "aeiou" else "a",
        color=color,
        shape=SHAPE_WORDS[shape][int(rng.integers(2))],
        side=SIDE_PHRASES[side][int(rng.integers(3))],
        distance=DISTANCE_PHRASES[distance][int(rng.integers(3))],
    )


def caption_vocabulary() -> list[str]:
    """List every word a caption can contain, for building the tokenizer."""
    texts = [*COLORS, *(w for pair in SHAPE_WORDS.values() for w in pair)]
    texts += [p for phrases in SIDE_PHRASES.values() for p in phrases]
    texts += [p for phrases in DISTANCE_PHRASES.values() for p in phrases]
    texts += [t.format(article="a an", color="", shape="", side="", distance="") for t in TEMPLATES]
    words = {w for text in texts for w in text.replace(",", " , ").split()}
    return sorted(words)
