"""Drawing primitives: colour arithmetic, outlines (the pen and the sketch) and fabric patterns."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from PIL import Image, ImageDraw

from lightclip.data.synth.vocabulary import Point, RGB


def shade(colour: RGB, factor: float) -> RGB:
    """Darken (factor < 1) or brighten a colour, clamped to 0-255."""
    return tuple(max(0, min(255, round(v * factor))) for v in colour)  # type: ignore[return-value]


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def luminance(colour: RGB) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def colour_distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def contrast_ink(colour: RGB) -> RGB:
    """A near-white or near-black detail colour that stands out on ``colour`` (buttons, laces)."""
    return (238, 238, 236) if luminance(colour) < 140 else (38, 38, 42)


# --- geometry ------------------------------------------------------------------------------


class Pen:
    """Maps product coordinates (roughly -1..1, y down) to canvas pixels with jitter applied."""

    __slots__ = ("cx", "cy", "unit", "cos", "sin", "mirror")

    def __init__(self, cx: float, cy: float, unit: float, angle_deg: float = 0.0, mirror: bool = False) -> None:
        self.cx, self.cy, self.unit, self.mirror = cx, cy, unit, mirror
        self.cos, self.sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))

    def pt(self, x: float, y: float) -> Point:
        if self.mirror:
            x = -x
        return (self.cx + (x * self.cos - y * self.sin) * self.unit, self.cy + (x * self.sin + y * self.cos) * self.unit)

    def pts(self, points: Sequence[Point]) -> list[Point]:
        return [self.pt(x, y) for x, y in points]

    def px(self, length: float) -> int:
        return max(1, round(length * self.unit))

    def shifted(self, dx: float, dy: float, zoom: float = 1.0) -> "Pen":
        """The same pen with its origin moved and scale changed (to centre and fit a product)."""
        cx, cy = self.pt(dx, dy)
        pen = Pen(cx, cy, self.unit * zoom, 0.0, self.mirror)
        pen.cos, pen.sin = self.cos, self.sin
        return pen


def mirror_x(points: Sequence[Point]) -> list[Point]:
    return [(-x, y) for x, y in points]


def arc(cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float, n: int = 16) -> list[Point]:
    step = (end_deg - start_deg) / n
    return [(cx + rx * math.cos(math.radians(start_deg + i * step)), cy + ry * math.sin(math.radians(start_deg + i * step))) for i in range(n + 1)]


def rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float) -> list[Point]:
    """A rounded rectangle as a polygon (so it rotates with the pen)."""
    return (arc(x1 - r, y0 + r, r, r, -90, 0, 4) + arc(x1 - r, y1 - r, r, r, 0, 90, 4)
            + arc(x0 + r, y1 - r, r, r, 90, 180, 4) + arc(x0 + r, y0 + r, r, r, 180, 270, 4))


def bezier(p0: Point, p1: Point, p2: Point, n: int = 8) -> list[Point]:
    return [((1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t * t * p2[0],
             (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t * t * p2[1]) for t in (i / n for i in range(n + 1))]


def along(path: Sequence[Point], t: float) -> Point:
    """The point at fraction ``t`` of a polyline's length."""
    lengths = [math.dist(a, b) for a, b in zip(path, path[1:])]
    target = t * sum(lengths)
    for (a, b), seg in zip(zip(path, path[1:]), lengths):
        if target <= seg and seg > 0:
            f = target / seg
            return (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)
        target -= seg
    return path[-1]


Op = Callable[[ImageDraw.ImageDraw], None]


class Sketch:
    """One product being drawn: a fabric mask (filled with the pattern) plus strokes above it.

    Drawers only describe shapes in product coordinates; the sketch applies the pen's jitter
    and keeps the draw order (fabric, then seams, then details) the same for every family.
    """

    def __init__(self, size: int, pen: Pen, base: RGB) -> None:
        self.size, self.pen, self.base = size, pen, base
        self.mask = Image.new("L", (size, size), 0)
        self._mask = ImageDraw.Draw(self.mask)
        self.over: list[Op] = []
        self.stroke = max(1, round(size / 90))
        self.edge = edge_colour(base)

    def shift(self, dx: float, dy: float, zoom: float = 1.0) -> None:
        self.pen = self.pen.shifted(dx, dy, zoom)

    def fabric(self, points: Sequence[Point]) -> None:
        """A patterned panel with a seam around it."""
        xy = self.pen.pts(points)
        self._mask.polygon(xy, fill=255)
        self._outline(xy, self.edge)

    def fabric_ring(self, outer: Sequence[Point], inner: Sequence[Point]) -> None:
        """A patterned panel with a hole (a belt loop)."""
        o, i = self.pen.pts(outer), self.pen.pts(inner)
        self._mask.polygon(o, fill=255)
        self._mask.polygon(i, fill=0)
        self._outline(o, self.edge)
        self._outline(i, self.edge)

    def solid(self, points: Sequence[Point], colour: RGB, outline: bool = True) -> None:
        """A plain-coloured part drawn above the fabric (sole, dial, lens, trim)."""
        xy = self.pen.pts(points)
        self.over.append(lambda d: d.polygon(xy, fill=colour))
        if outline:
            self._outline(xy, edge_colour(colour))

    def ellipse(self, x: float, y: float, r: float, colour: RGB, outline: bool = False) -> None:
        cx, cy = self.pen.pt(x, y)
        rr = max(1.0, r * self.pen.unit)
        box = [cx - rr, cy - rr, cx + rr, cy + rr]
        width = self.stroke if outline else 0
        self.over.append(lambda d: d.ellipse(box, fill=colour, outline=edge_colour(colour) if outline else None, width=width))

    def line(self, points: Sequence[Point], colour: RGB, width: float, closed: bool = False) -> None:
        xy = self.pen.pts(points)
        if closed:
            xy = xy + xy[:1]
        px = self.pen.px(width)
        self.over.append(lambda d: d.line(xy, fill=colour, width=px, joint="curve"))

    def seam(self, points: Sequence[Point], colour: RGB | None = None) -> None:
        """A thin stroke (fold, placket, stitching) in the edge colour unless told otherwise."""
        xy = self.pen.pts(points)
        fill, width = colour or self.edge, self.stroke
        self.over.append(lambda d: d.line(xy, fill=fill, width=width, joint="curve"))

    def _outline(self, xy: list[Point], colour: RGB) -> None:
        closed, width = xy + xy[:1], self.stroke
        self.over.append(lambda d: d.line(closed, fill=colour, width=width, joint="curve"))


def edge_colour(colour: RGB) -> RGB:
    """Seams: darker than the fabric, except on near-black fabric where they are lighter."""
    return shade(colour, 0.6) if luminance(colour) >= 50 else mix(colour, (255, 255, 255), 0.25)


# --- patterns ------------------------------------------------------------------------------


def pattern_fill(size: int, pattern: str, base: RGB, second: RGB | None, period: float, phase: float,
                 vertical: bool = False) -> Image.Image:
    """A full-canvas fabric swatch; the period is chosen by the caller to survive downsampling."""
    image = Image.new("RGB", (size, size), base)
    if pattern == "solid":
        return image
    if second is None:
        raise ValueError(f"pattern {pattern!r} needs a second colour")
    draw = ImageDraw.Draw(image)
    steps = int(size / period) + 2
    if pattern == "striped":
        band = period * 0.45
        for k in range(-1, steps):
            a = phase + k * period
            box = [a, 0, a + band, size] if vertical else [0, a, size, a + band]
            draw.rectangle(box, fill=second)
    elif pattern == "checked":
        band, blend = period * 0.42, mix(base, second, 0.5)
        for k in range(-1, steps):
            a = phase + k * period
            draw.rectangle([0, a, size, a + band], fill=blend)
            draw.rectangle([a, 0, a + band, size], fill=blend)
        for i in range(-1, steps):
            for j in range(-1, steps):
                x, y = phase + i * period, phase + j * period
                draw.rectangle([x, y, x + band, y + band], fill=second)
    elif pattern == "dotted":
        r = period * 0.24
        for j in range(-1, steps):
            for i in range(-1, steps):
                x = phase + i * period + (period / 2 if j % 2 else 0)
                y = phase + j * period
                draw.ellipse([x - r, y - r, x + r, y + r], fill=second)
    elif pattern == "floral":
        r, centre = period * 0.15, mix(second, (250, 230, 120), 0.6)
        for j in range(-1, steps):
            for i in range(-1, steps):
                x = phase + i * period + (period / 2 if j % 2 else 0)
                y = phase + j * period
                for p in range(5):
                    a = math.radians(72 * p + 18 * (i + j))
                    px, py = x + math.cos(a) * r * 1.3, y + math.sin(a) * r * 1.3
                    draw.ellipse([px - r, py - r, px + r, py + r], fill=second)
                draw.ellipse([x - r * 0.7, y - r * 0.7, x + r * 0.7, y + r * 0.7], fill=centre)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return image
