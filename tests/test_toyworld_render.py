"""The renderer's labels checked against the scene geometry."""

import numpy as np
import pytest

from helpers.toyworld.render import RenderedScene, camera_rays, render, render_scene
from helpers.toyworld.scene import (
    COLORS,
    SHAPES,
    Scene,
    SceneObject,
    caption_vocabulary,
    compose_caption,
    horizontal_position,
    sample_scene,
)


def single_object_scene(shape: str, x: float = 0.0, z: float = 5.0, size: float = 0.6) -> Scene:
    """A scene with one object straight ahead and a light from behind the camera."""
    height = 2.0 * size if shape in ("sphere", "cube") else 3.0 * size
    obj = SceneObject(shape, "red", x, z, size, height, 0.0, COLORS["red"])
    return Scene(
        seed=0,
        objects=[obj],
        camera_height=1.5,
        camera_pitch=np.deg2rad(15.0),
        light_direction=(0.0, 0.8, -0.6),
        ground_rgb=(0.5, 0.5, 0.5),
        ground_tile=1.0,
        ground_phase=(0.0, 0.0),
        sky_top=(0.2, 0.4, 0.8),
        sky_horizon=(0.8, 0.9, 1.0),
        phrasing=0,
    )


def test_sphere_depth_at_centre_pixel():
    scene = single_object_scene("sphere", size=0.8)
    rendered = render_scene(scene, size=64)
    origins, directions = camera_rays(scene, 64)
    obj = scene.objects[0]
    centre = np.array([obj.x, obj.size, obj.z])

    # The pixel whose ray passes closest to the sphere centre sees the nearest surface point.
    to_centre = centre - origins[0]
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    along = unit @ to_centre
    miss = np.linalg.norm(to_centre[None] - along[:, None] * unit, axis=1)
    pixel = int(np.argmin(miss))
    row, column = divmod(pixel, 64)
    assert rendered.object_masks[0, row, column]

    # Expected z-depth: the ray parameter of the first hit, with camera-space z equal to 1.
    t_centre = along[pixel] / np.linalg.norm(directions[pixel])
    half_chord = np.sqrt(obj.size**2 - miss[pixel] ** 2)
    expected = t_centre - half_chord / np.linalg.norm(directions[pixel])
    assert rendered.depth[row, column] == pytest.approx(expected, rel=1e-4)
    assert rendered.inverse_depth[row, column] == pytest.approx(1.0 / expected, rel=1e-4)


def test_sphere_mask_area_matches_projection():
    size = 256  # fine pixels so the disc area is accurate
    scene = single_object_scene("sphere", z=6.0, size=0.7)
    rendered = render_scene(scene, size=size)
    obj = scene.objects[0]
    camera = np.array([0.0, scene.camera_height, 0.0])
    distance = np.linalg.norm(np.array([obj.x, obj.size, obj.z]) - camera)

    # A sphere seen near the optical axis projects to a disc of angular radius asin(r / d).
    focal = (size / 2.0) / np.tan(np.deg2rad(50.0) / 2.0)
    radius_pixels = focal * np.tan(np.arcsin(obj.size / distance))
    expected_area = np.pi * radius_pixels**2
    area = rendered.object_masks[0].sum()
    assert area == pytest.approx(expected_area, rel=0.06)


def test_ground_depth_at_horizon_row():
    scene = single_object_scene("cube")
    rendered = render_scene(scene, size=64)
    assert not rendered.salient_mask[60, 2], "the object must not cover the checked pixel"
    # A ground pixel's ray reaches y = 0 at z-depth h / (sin(pitch) - y_camera cos(pitch)).
    focal = 32.0 / np.tan(np.deg2rad(25.0))
    row = 60
    y_camera = -(row + 0.5 - 32.0) / focal
    pitch = scene.camera_pitch
    expected = scene.camera_height / (np.sin(pitch) - y_camera * np.cos(pitch))
    assert rendered.depth[row, 2] == pytest.approx(expected, rel=1e-5)


def test_sky_has_infinite_depth_and_zero_inverse_depth():
    rendered = render(3)
    sky = ~np.isfinite(rendered.depth)
    assert sky[0].all(), "the top row looks at the sky"
    assert (rendered.inverse_depth[sky] == 0).all()
    assert rendered.relative_inverse_depth.max() == pytest.approx(1.0)
    assert rendered.relative_inverse_depth.min() == 0.0


def test_render_is_deterministic_per_seed():
    first, second = render(123), render(123)
    assert np.array_equal(first.image, second.image)
    assert np.array_equal(first.depth, second.depth)
    assert np.array_equal(first.salient_mask, second.salient_mask)
    assert first.caption == second.caption
    assert not np.array_equal(first.image, render(124).image)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders_a_visible_object(shape):
    rendered = render_scene(single_object_scene(shape), size=64)
    assert rendered.salient_mask.sum() > 50
    assert rendered.shape == shape
    # The object is nearer than the ground behind it.
    rows, columns = np.nonzero(rendered.salient_mask)
    assert np.isfinite(rendered.depth[rows, columns]).all()


def test_salient_object_is_largest_and_named_in_caption():
    for seed in range(40):
        rendered: RenderedScene = render(seed)
        areas = rendered.object_masks.reshape(len(rendered.object_masks), -1).sum(axis=1)
        assert rendered.salient_index == int(areas.argmax())
        assert np.array_equal(rendered.salient_mask, rendered.object_masks[rendered.salient_index])
        assert rendered.color in rendered.caption
        assert horizontal_position(rendered.salient_mask) == rendered.side


def test_masks_are_disjoint_and_cast_shadows_darken_ground():
    rendered = render(7)
    assert (rendered.object_masks.sum(axis=0) <= 1).all()

    # Shadows: moving the objects to the far distance brightens some nearby ground pixels.
    scene = sample_scene(7)
    distant = SceneObject("sphere", "red", 0.0, 40.0, 0.6, 1.2, 0.0, (1.0, 0.0, 0.0))
    bare = render_scene(Scene(**{**scene.__dict__, "objects": [distant]}))
    ground = ~rendered.object_masks.any(axis=0) & np.isfinite(rendered.depth)
    darker = rendered.image[ground].sum(axis=1) < bare.image[ground].sum(axis=1) - 20
    assert darker.sum() > 5


def test_scene_variety_over_seeds():
    scenes = [render(seed) for seed in range(200)]
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.color for s in scenes} == set(COLORS)
    assert {s.side for s in scenes} == {"left", "centre", "right"}
    assert {s.distance for s in scenes} == {"near", "middle", "far"}
    assert {len(s.object_masks) for s in scenes} == {1, 2, 3}
    assert len({s.caption for s in scenes}) > 150


def test_caption_phrasing_varies_and_uses_vocabulary():
    captions = {compose_caption("red", "cube", "left", "near", phrasing) for phrasing in range(50)}
    assert len(captions) > 10
    vocabulary = set(caption_vocabulary())
    for caption in captions:
        assert set(caption.replace(",", " , ").split()) <= vocabulary
    assert compose_caption("orange", "cone", "right", "far", 1).count("an orange") == 1


def test_horizontal_position_of_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        horizontal_position(np.zeros((8, 8), dtype=bool))
