"""Vectorised ray intersections with the toy world's primitives.

Every function takes ray origins and directions as arrays of shape (N, 3), with y pointing up,
and returns the ray parameter of the nearest hit in front of the origin (``inf`` on a miss)
and the unit surface normal there, shape (N, 3). Directions need not be unit length, so the
camera can pass rays whose camera-space z component is 1 and read z-depth off the parameter.
"""

import numpy as np

# Hits closer than this are ignored, so a shadow ray does not hit its own surface.
EPSILON = 1e-4


def _nearest_positive_root(a, b, c):
    """Return the smallest root above EPSILON of a t^2 + b t + c = 0 and both roots, or inf."""
    discriminant = b * b - 4.0 * a * c
    has_root = (discriminant >= 0.0) & (np.abs(a) > 1e-12)
    sqrt_disc = np.sqrt(np.where(has_root, discriminant, 0.0))
    safe_a = np.where(has_root, a, 1.0)
    t_near = (-b - sqrt_disc) / (2.0 * safe_a)
    t_far = (-b + sqrt_disc) / (2.0 * safe_a)
    low = np.minimum(t_near, t_far)
    high = np.maximum(t_near, t_far)
    low = np.where(has_root, low, np.inf)
    high = np.where(has_root, high, np.inf)
    t = np.where(low > EPSILON, low, np.where(high > EPSILON, high, np.inf))
    return t, low, high


def _rotate_y(vectors, angle):
    """Rotate vectors (N, 3) about the vertical axis by angle radians."""
    cos, sin = np.cos(angle), np.sin(angle)
    x, y, z = vectors[:, 0], vectors[:, 1], vectors[:, 2]
    return np.stack([cos * x + sin * z, y, -sin * x + cos * z], axis=1)


def _normalise(vectors):
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norm, 1e-12)


def intersect_ground(origins, directions):
    """Hit the plane y = 0 from above."""
    dy = directions[:, 1]
    safe_dy = np.where(dy < -1e-9, dy, -1.0)
    t = np.where(dy < -1e-9, -origins[:, 1] / safe_dy, np.inf)
    t = np.where(t > EPSILON, t, np.inf)
    normals = np.zeros_like(origins)
    normals[:, 1] = 1.0
    return t, normals


def intersect_sphere(origins, directions, center, radius):
    offset = origins - center
    a = np.einsum("ij,ij->i", directions, directions)
    b = 2.0 * np.einsum("ij,ij->i", offset, directions)
    c = np.einsum("ij,ij->i", offset, offset) - radius * radius
    t, _, _ = _nearest_positive_root(a, b, c)
    points = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
    return t, _normalise(points - center)


def intersect_box(origins, directions, center, half_size, angle):
    """Hit a cube of the given half edge length, rotated about the vertical axis by angle."""
    local_origins = _rotate_y(origins - center, -angle)
    local_directions = _rotate_y(directions, -angle)

    # Slab method: the ray is inside the box between the largest entry and smallest exit.
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / np.where(np.abs(local_directions) > 1e-12, local_directions, 1e-12)
    t_low = (-half_size - local_origins) * inverse
    t_high = (half_size - local_origins) * inverse
    t_entry_axes = np.minimum(t_low, t_high)
    t_exit_axes = np.maximum(t_low, t_high)
    t_entry = t_entry_axes.max(axis=1)
    t_exit = t_exit_axes.min(axis=1)
    hit = (t_exit >= t_entry) & (t_exit > EPSILON)
    t = np.where(t_entry > EPSILON, t_entry, t_exit)
    t = np.where(hit, t, np.inf)

    # The entry face's axis gives the normal, pointing against the ray.
    entry_axis = t_entry_axes.argmax(axis=1)
    local_normals = np.zeros_like(origins)
    rows = np.arange(len(origins))
    local_normals[rows, entry_axis] = -np.sign(local_directions[rows, entry_axis])
    return t, _rotate_y(local_normals, angle)


def intersect_cylinder(origins, directions, base_center, radius, height):
    """Hit a vertical cylinder standing on base_center, with its top cap."""
    offset = origins - base_center
    dx, dy, dz = directions[:, 0], directions[:, 1], directions[:, 2]
    ox, oy, oz = offset[:, 0], offset[:, 1], offset[:, 2]

    # Side wall: x^2 + z^2 = r^2 with 0 <= y <= height.
    a = dx * dx + dz * dz
    b = 2.0 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - radius * radius
    _, low, high = _nearest_positive_root(a, b, c)
    t_side = np.full(len(origins), np.inf)
    for root in (high, low):  # the lower root overwrites where both are valid
        y = oy + root * dy
        valid = (root > EPSILON) & (y >= 0.0) & (y <= height) & np.isfinite(root)
        t_side = np.where(valid, root, t_side)

    # Top cap: y = height inside the radius.
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = np.where(np.abs(dy) > 1e-12, (height - oy) / dy, np.inf)
    cap_x = ox + t_cap * dx
    cap_z = oz + t_cap * dz
    cap_valid = (t_cap > EPSILON) & (cap_x * cap_x + cap_z * cap_z <= radius * radius)
    t_cap = np.where(cap_valid, t_cap, np.inf)

    t = np.minimum(t_side, t_cap)
    points = offset + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
    side_normals = points * np.array([1.0, 0.0, 1.0])
    cap_normals = np.tile(np.array([0.0, 1.0, 0.0]), (len(origins), 1))
    normals = np.where((t_cap <= t_side)[:, None], cap_normals, _normalise(side_normals))
    return t, normals


def intersect_cone(origins, directions, base_center, radius, height):
    """Hit a vertical cone standing on base_center with its apex at the given height."""
    offset = origins - base_center
    dx, dy, dz = directions[:, 0], directions[:, 1], directions[:, 2]
    ox, oy, oz = offset[:, 0], offset[:, 1], offset[:, 2]
    slope = radius / height

    # Side: x^2 + z^2 = (slope (height - y))^2 with 0 <= y <= height.
    a = dx * dx + dz * dz - slope * slope * dy * dy
    b = 2.0 * (ox * dx + oz * dz + slope * slope * (height - oy) * dy)
    c = ox * ox + oz * oz - slope * slope * (height - oy) ** 2
    _, low, high = _nearest_positive_root(a, b, c)
    t = np.full(len(origins), np.inf)
    for root in (high, low):
        y = oy + root * dy
        valid = (root > EPSILON) & (y >= 0.0) & (y <= height) & np.isfinite(root)
        t = np.where(valid, root, t)

    # The outward normal of the side leans up by the cone's half angle.
    points = offset + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
    horizontal = _normalise(points * np.array([1.0, 0.0, 1.0]))
    normals = horizontal + np.array([0.0, slope, 0.0])
    return t, _normalise(normals)
