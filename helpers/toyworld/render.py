"""Ray-cast renderer of toy-world scenes with exact per-pixel labels.

The camera sits at height ``camera_height`` above the origin, looks along +z and is pitched
down by ``camera_pitch``. Each pixel casts one ray whose camera-space z component is 1, so the
ray parameter of a hit is the pixel's z-depth (distance along the viewing axis).

Label conventions:

- ``depth``: z-depth in world units, ``inf`` for sky.
- ``inverse_depth``: 1 / z-depth, 0 for sky. Monocular estimators such as MiDaS predict this
  quantity up to an unknown scale and shift ("relative inverse depth").
- ``relative_inverse_depth``: ``inverse_depth`` divided by its maximum in the image, so it lies
  in [0, 1] with 1 at the nearest pixel and 0 at the sky.
- ``object_masks``: one boolean mask per object, its visible pixels.
- ``salient_mask``: the visible pixels of the salient object, the object with the largest
  visible area, which is also the object the caption names.
"""

from dataclasses import dataclass

import numpy as np

from .geometry import (
    intersect_box,
    intersect_cone,
    intersect_cylinder,
    intersect_ground,
    intersect_sphere,
)
from .scene import (
    FIELD_OF_VIEW,
    Scene,
    SceneObject,
    compose_caption,
    distance_band,
    horizontal_position,
    sample_scene,
)

AMBIENT = 0.35
DIFFUSE = 0.75


@dataclass
class RenderedScene:
    """One rendered image with its exact labels."""

    image: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, inf for sky
    inverse_depth: np.ndarray  # (H, W) float32, 0 for sky
    relative_inverse_depth: np.ndarray  # (H, W) float32 in [0, 1]
    object_masks: np.ndarray  # (objects, H, W) bool
    salient_mask: np.ndarray  # (H, W) bool
    salient_index: int
    caption: str
    color: str
    shape: str
    side: str  # "left", "centre" or "right"
    distance: str  # "near", "middle" or "far"
    scene: Scene


def camera_rays(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ray origins and directions (size * size, 3) in row-major pixel order."""
    focal = (size / 2.0) / np.tan(np.deg2rad(FIELD_OF_VIEW) / 2.0)
    centres = (np.arange(size) + 0.5 - size / 2.0) / focal
    x_camera, y_camera = np.meshgrid(centres, -centres)  # image rows go down, y goes up

    pitch = scene.camera_pitch
    right = np.array([1.0, 0.0, 0.0])
    up = np.array([0.0, np.cos(pitch), np.sin(pitch)])
    forward = np.array([0.0, -np.sin(pitch), np.cos(pitch)])
    directions = x_camera.reshape(-1, 1) * right + y_camera.reshape(-1, 1) * up + forward[None, :]
    origins = np.tile(np.array([0.0, scene.camera_height, 0.0]), (size * size, 1))
    return origins, directions


def intersect_object(obj: SceneObject, origins: np.ndarray, directions: np.ndarray):
    """Intersect rays with one scene object; returns (t, normals)."""
    base = np.array([obj.x, 0.0, obj.z])
    if obj.shape == "sphere":
        return intersect_sphere(origins, directions, base + [0.0, obj.size, 0.0], obj.size)
    if obj.shape == "cube":
        return intersect_box(origins, directions, base + [0.0, obj.size, 0.0], obj.size, obj.angle)
    if obj.shape == "cylinder":
        return intersect_cylinder(origins, directions, base, obj.size, obj.height)
    if obj.shape == "cone":
        return intersect_cone(origins, directions, base, obj.size, obj.height)
    raise ValueError(f"Unknown shape {obj.shape!r}; expected sphere, cube, cylinder or cone.")


def _ground_albedo(scene: Scene, points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Checkerboard texture whose contrast fades with distance, which avoids aliasing."""
    u = np.floor(points[:, 0] / scene.ground_tile + scene.ground_phase[0])
    v = np.floor(points[:, 2] / scene.ground_tile + scene.ground_phase[1])
    checker = ((u + v) % 2.0) * 2.0 - 1.0
    contrast = 0.12 * np.exp(-np.maximum(distance - 3.0, 0.0) / 6.0)
    return np.clip(
        np.array(scene.ground_rgb)[None, :] * (1.0 + contrast[:, None] * checker[:, None]), 0, 1
    )


def _sky(scene: Scene, directions: np.ndarray) -> np.ndarray:
    elevation = directions[:, 1] / np.linalg.norm(directions, axis=1)
    blend = np.clip(elevation * 3.0, 0.0, 1.0)[:, None]
    return (1.0 - blend) * np.array(scene.sky_horizon) + blend * np.array(scene.sky_top)


def render_scene(scene: Scene, size: int = 64) -> RenderedScene:
    """Render a scene to an RGB image and its labels at size x size pixels."""
    origins, directions = camera_rays(scene, size)
    light = np.array(scene.light_direction)

    # 1. Primary rays: nearest hit among the ground (index 0) and the objects (1..n).
    hits = [intersect_ground(origins, directions)]
    hits += [intersect_object(obj, origins, directions) for obj in scene.objects]
    t_all = np.stack([t for t, _ in hits])
    normals_all = np.stack([n for _, n in hits])
    nearest = t_all.argmin(axis=0)
    t = t_all[nearest, np.arange(len(nearest))]
    is_hit = np.isfinite(t)
    normals = normals_all[nearest, np.arange(len(nearest))]
    points = origins + np.where(is_hit, t, 0.0)[:, None] * directions

    # 2. Shadow rays from every hit point towards the light, tested against the objects.
    shadow_origins = points + 1e-3 * normals
    shadow_directions = np.broadcast_to(light, points.shape)
    in_shadow = np.zeros(len(points), dtype=bool)
    for obj in scene.objects:
        t_shadow, _ = intersect_object(obj, shadow_origins, shadow_directions)
        in_shadow |= np.isfinite(t_shadow)
    in_shadow &= is_hit

    # 3. Shading: Lambert with ambient light, sky where nothing is hit.
    albedo = _ground_albedo(scene, points, np.where(is_hit, t, 0.0))
    for index, obj in enumerate(scene.objects, start=1):
        albedo[nearest == index] = obj.rgb
    lambert = np.clip(np.einsum("ij,j->i", normals, light), 0.0, 1.0)
    shading = AMBIENT + DIFFUSE * lambert * ~in_shadow
    colour = albedo * shading[:, None]
    colour = np.where(is_hit[:, None], colour, _sky(scene, directions))
    image = (np.clip(colour, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(size, size, 3)

    # 4. Labels straight from the geometry.
    depth = np.where(is_hit, t, np.inf).reshape(size, size).astype(np.float32)
    inverse_depth = np.where(is_hit, 1.0 / np.where(is_hit, t, 1.0), 0.0)
    inverse_depth = inverse_depth.reshape(size, size).astype(np.float32)
    relative = inverse_depth / max(float(inverse_depth.max()), 1e-12)
    object_masks = np.stack(
        [(nearest == index).reshape(size, size) for index in range(1, len(scene.objects) + 1)]
    )
    areas = object_masks.reshape(len(scene.objects), -1).sum(axis=1)
    if areas.max() == 0:
        raise ValueError(f"Scene {scene.seed} shows no object; sample another seed.")
    salient_index = int(areas.argmax())
    salient = scene.objects[salient_index]
    salient_mask = object_masks[salient_index]

    side = horizontal_position(salient_mask)
    distance = distance_band(salient, scene.camera_pitch, scene.camera_height)
    caption = compose_caption(salient.color, salient.shape, side, distance, scene.phrasing)
    return RenderedScene(
        image=image,
        depth=depth,
        inverse_depth=inverse_depth,
        relative_inverse_depth=relative.astype(np.float32),
        object_masks=object_masks,
        salient_mask=salient_mask,
        salient_index=salient_index,
        caption=caption,
        color=salient.color,
        shape=salient.shape,
        side=side,
        distance=distance,
        scene=scene,
    )


def render(seed: int, size: int = 64) -> RenderedScene:
    """Sample the scene for a seed and render it."""
    return render_scene(sample_scene(seed), size)


def render_batch(seeds, size: int = 64) -> dict[str, np.ndarray | list]:
    """Render many seeds into stacked arrays: images, depths, masks and captions."""
    scenes = [render(int(seed), size) for seed in seeds]
    return {
        "images": np.stack([s.image for s in scenes]),
        "relative_inverse_depth": np.stack([s.relative_inverse_depth for s in scenes]),
        "salient_masks": np.stack([s.salient_mask for s in scenes]),
        "captions": [s.caption for s in scenes],
        "scenes": scenes,
    }
