"""Rendering scenes to RGB images with torch (vectorised over a batch).

Coordinates are in units of the image width: ``x`` grows to the right, ``y`` downwards, the
image spans ``[0, 1]^2`` and pixel ``(i, j)`` has its centre at ``((j + 0.5) / S, (i + 0.5) / S)``.
Each shape is an exact signed-distance function ``d`` (rotated by its angle); its coverage
``clamp(0.5 - d * S, 0, 1)`` gives one-pixel antialiased edges, and shapes are composited over
the background in scene order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .attributes import POSITION_XY, SHAPES, SIZE_RADIUS
from .scene import MAX_SHAPES, Nuisance, Scene, check_size

_SQRT3 = math.sqrt(3.0)
#: Per-shape extent relative to the size radius r: square half-side (equal area to the circle),
#: triangle half-side, cross arm half-width, ring inner radius.
SQUARE_HALF = math.sqrt(math.pi) / 2
TRIANGLE_HALF_SIDE = 1.15
CROSS_HALF_WIDTH = 0.36
RING_INNER = 0.45


def _sd_box(px: Tensor, py: Tensor, hx: Tensor, hy: Tensor) -> Tensor:
    qx, qy = px.abs() - hx, py.abs() - hy
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _sd_circle(px, py, r):
    return torch.hypot(px, py) - r


def _sd_square(px, py, r):
    return _sd_box(px, py, SQUARE_HALF * r, SQUARE_HALF * r)


def _sd_triangle(px, py, r):
    # equilateral, pointing up, bounding box centred on the position (iq's exact 2D SDF)
    a = TRIANGLE_HALF_SIDE * r
    h = _SQRT3 * a
    x = px.abs() - a
    y = (-py + h / 6) + a / _SQRT3
    fold = (x + _SQRT3 * y) > 0
    x, y = torch.where(fold, (x - _SQRT3 * y) / 2, x), torch.where(fold, (-_SQRT3 * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * a), torch.zeros_like(x))
    return -torch.hypot(x, y) * torch.sign(y)


def _sd_cross(px, py, r):
    w = CROSS_HALF_WIDTH * r
    return torch.minimum(_sd_box(px, py, r, w), _sd_box(px, py, w, r))


def _sd_ring(px, py, r):
    mid, half = (1 + RING_INNER) / 2 * r, (1 - RING_INNER) / 2 * r
    return (torch.hypot(px, py) - mid).abs() - half


_SDF = {"circle": _sd_circle, "square": _sd_square, "triangle": _sd_triangle, "cross": _sd_cross, "ring": _sd_ring}
assert set(_SDF) == set(SHAPES)


def _background(nuisances: Sequence[Nuisance], size: int) -> Tensor:
    """Background field [n, 3, S, S]: base colour + gradient or texture (grey-level, clamped)."""
    n = len(nuisances)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    ys, xs = coords.view(size, 1), coords.view(1, size)
    base = torch.tensor([nu.background_rgb for nu in nuisances], dtype=torch.float32).view(n, 3, 1, 1)
    field = torch.zeros(n, 1, size, size)
    for i, nu in enumerate(nuisances):
        if nu.style == "gradient":  # a ramp of +-amplitude across the image along `direction`
            ramp = xs * math.cos(nu.direction) + ys * math.sin(nu.direction)
            field[i, 0] = nu.amplitude * ramp / ((abs(math.cos(nu.direction)) + abs(math.sin(nu.direction))) / 2)
        elif nu.style == "texture":
            wave = sum(torch.sin(2 * math.pi * (fx * xs + fy * ys) + phase) for fx, fy, phase in nu.waves)
            field[i, 0] = nu.amplitude * wave / math.sqrt(len(nu.waves))
    return (base + field).clamp(0, 1)


def render_batch(scenes: Sequence[Scene], nuisances: Sequence[Nuisance], size: int) -> tuple[Tensor, Tensor]:
    """Images [n, 3, S, S] in [0, 1] and per-shape coverage masks [n, 2, S, S] (before occlusion;
    slot j is the scene's j-th shape, zero when absent)."""
    size = check_size(size)
    n = len(scenes)
    cx, cy, rad, angle = (torch.zeros(n, MAX_SHAPES) for _ in range(4))
    kind = torch.full((n, MAX_SHAPES), -1, dtype=torch.long)
    rgb = torch.zeros(n, MAX_SHAPES, 3)
    for i, (scene, nu) in enumerate(zip(scenes, nuisances)):
        for j, s in enumerate(scene.shapes):
            x, y = POSITION_XY[s.position]
            cx[i, j], cy[i, j] = x + nu.offset[j][0], y + nu.offset[j][1]
            rad[i, j] = SIZE_RADIUS[s.size] * nu.scale[j]
            angle[i, j] = nu.angle[j]
            kind[i, j] = SHAPES.index(s.shape)
            rgb[i, j] = torch.tensor(nu.rgb[j])
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dx = coords.view(1, 1, 1, size) - cx[:, :, None, None]
    dy = coords.view(1, 1, size, 1) - cy[:, :, None, None]
    dx, dy = torch.broadcast_tensors(dx, dy)
    cos, sin = torch.cos(angle)[:, :, None, None], torch.sin(angle)[:, :, None, None]
    px, py = cos * dx + sin * dy, -sin * dx + cos * dy  # rotate the frame by -angle
    r = rad[:, :, None, None].expand_as(px)
    dist = torch.full_like(px, float("inf"))
    for k, name in enumerate(SHAPES):
        sel = kind == k
        if bool(sel.any()):
            dist[sel] = _SDF[name](px[sel], py[sel], r[sel])
    masks = (0.5 - dist * size).clamp(0.0, 1.0)
    img = _background(nuisances, size)
    for j in range(MAX_SHAPES):
        a = masks[:, j:j + 1]
        img = img * (1 - a) + rgb[:, j, :, None, None] * a
    return img.clamp(0.0, 1.0).contiguous(), masks
