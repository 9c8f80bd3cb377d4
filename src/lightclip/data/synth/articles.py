"""One drawing function per silhouette family, and the rendering of a product's image."""

from __future__ import annotations

import math
import random
from typing import Callable

from PIL import Image, ImageDraw

from lightclip.data.synth.drawing import Pen, Sketch, along, arc, bezier, contrast_ink, luminance, mirror_x, mix, pattern_fill, rounded_rect, shade
from lightclip.data.synth.vocabulary import ARTICLE_BY_NAME, BACKGROUNDS, COLOURS, LENS_TINTS, METALS, ItemSpec, Point


def _sleeve(sleeve: str | None, w: float, top: float, reach: float) -> list[Point] | None:
    """The right sleeve of a top or dress (mirror it for the left)."""
    if sleeve == "short":
        return [(w + 0.02, top + 0.08), (w + 0.36, top + 0.34), (w + 0.2, top + 0.54), (w - 0.01, top + 0.42)]
    if sleeve == "long":
        return [(w + 0.02, top + 0.08), (w + 0.24, top + 0.24), (w + 0.36, top + reach), (w + 0.15, top + reach + 0.03), (w - 0.01, top + 0.46)]
    return None


def draw_top(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """T-shirts, shirts, tops, sweaters, jackets and kurtas: torso, sleeves, neckline, closures."""
    kind = spec.article
    top = -0.92 if kind == "Kurtas" else -0.78
    hem = {"Tshirts": 0.72, "Shirts": 0.78, "Tops": 0.52, "Sweaters": 0.72, "Jackets": 0.72, "Kurtas": 0.98}[kind]
    w = {"Sweaters": 0.5, "Jackets": 0.52, "Kurtas": 0.44}.get(kind, 0.47) - (0.05 if spec.fit == "Slim Fit" else 0.0)
    hem_w = w + {"Kurtas": 0.12, "Tops": 0.05}.get(kind, 0.0)
    nw, arm = 0.16, top + 0.42
    if kind == "Tops":
        sk.shift(0, 0.12)
    collared = kind in ("Shirts", "Jackets")
    depth = 0.36 if spec.style == "vneck" else 0.2 if collared or kind == "Kurtas" else 0.15
    reach = 1.1 if kind == "Kurtas" else 1.3
    sleeve = _sleeve(spec.sleeve, w, top, reach)
    if sleeve:
        sk.fabric(sleeve)
        sk.fabric(mirror_x(sleeve))
    if spec.sleeve == "sleeveless":
        right = [(w - 0.14, top + 0.03), (w - 0.13, top + 0.24), (w, arm), (hem_w, hem)]
    else:
        right = [(w + 0.06, top + 0.1), (w, arm), (hem_w, hem)]
    neck = [(0.0, top + depth)] if spec.style == "vneck" else [(nw * 0.55, top + depth * 0.8), (0.0, top + depth), (-nw * 0.55, top + depth * 0.8)]
    sk.fabric([(-nw, top)] + mirror_x(right) + right[::-1] + [(nw, top)] + neck)
    neckline = [(-nw, top)] + neck[::-1] + [(nw, top)]
    ink, metal = contrast_ink(sk.base), METALS["silver"]
    if kind in ("Tshirts", "Tops", "Sweaters"):
        sk.line(neckline, shade(sk.base, 0.8), 0.05 if kind == "Sweaters" else 0.035)
    if kind == "Sweaters":
        _rib_band(sk, -hem_w, hem_w, hem - 0.12, hem)
        if sleeve:
            (x0, _), (x1, y1) = sleeve[3], sleeve[2]
            _rib_band(sk, x1 - 0.01, x0 + 0.01, y1 - 0.12, y1 + 0.02, both_sides=True)
    if collared:
        big = 0.06 if kind == "Jackets" else 0.0
        collar = [(-nw - 0.03 - big, top - 0.03), (0.0, top + 0.17), (-0.1 - big, top + 0.3 + big), (-nw - 0.06 - big, top + 0.08)]
        sk.fabric(collar)
        sk.fabric(mirror_x(collar))
    if kind == "Shirts":
        sk.seam([(0.0, top + 0.17), (0.0, hem)])
        for k in range(int((hem - top - 0.3) / 0.2) + 1):
            sk.ellipse(0.035, top + 0.3 + 0.2 * k, 0.035, ink)
        sk.seam([(-0.34, top + 0.42), (-0.12, top + 0.42), (-0.12, top + 0.62), (-0.34, top + 0.62), (-0.34, top + 0.42)])
        if sleeve and spec.sleeve == "long":
            for pts in (sleeve, mirror_x(sleeve)):
                sk.seam([along([pts[2], pts[1]], 0.12), along([pts[3], pts[4]], 0.12)])
    if kind == "Jackets":
        sk.line([(0.0, top + 0.17), (0.0, hem)], metal, 0.035)
        _rib_band(sk, -hem_w, hem_w, hem - 0.1, hem)
        for side in (-1, 1):
            sk.line([(side * 0.36, hem - 0.42), (side * 0.24, hem - 0.2)], sk.edge, 0.03)
    if kind == "Kurtas":
        sk.line([(-nw, top), (nw, top)], sk.edge, 0.05)
        sk.seam([(0.0, top + depth), (0.0, top + 0.55)])
        for k in range(3):
            sk.ellipse(0.0, top + 0.3 + 0.1 * k, 0.03, ink)
        for side in (-1, 1):
            sk.seam([(side * hem_w, hem), (side * (hem_w - 0.03), hem - 0.3)])


def _rib_band(sk: Sketch, x0: float, x1: float, y0: float, y1: float, both_sides: bool = False) -> None:
    """Knitted hem/cuff: a darker band with vertical ribs (mirrored for a pair of cuffs)."""
    band = shade(sk.base, 0.82) if luminance(sk.base) >= 50 else mix(sk.base, (255, 255, 255), 0.12)
    for flip in ((False, True) if both_sides else (False,)):
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        sk.solid(mirror_x(pts) if flip else pts, band)
        n = max(2, int(abs(x1 - x0) / 0.07))
        for k in range(1, n):
            x = x0 + (x1 - x0) * k / n
            sk.seam(mirror_x([(x, y0), (x, y1)]) if flip else [(x, y0), (x, y1)])


DRESS_HEM: dict[str, tuple[float, float]] = {"mini": (0.12, 0.52), "midi": (0.52, 0.62), "maxi": (0.95, 0.7)}
SKIRT_HEM: dict[str, tuple[float, float]] = {"mini": (0.0, 0.6), "midi": (0.48, 0.66), "maxi": (0.95, 0.72)}


def draw_dress(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Dresses: bodice with sleeves or straps, waist seam, flared skirt whose hem sets the length."""
    top, waist, w = -0.86, -0.3, 0.28
    hem, hem_w = DRESS_HEM[spec.length or "midi"]
    sk.shift(0, (0.95 - hem) / 2)
    sleeve = _sleeve(spec.sleeve, w, top, 1.0)
    if sleeve:
        sk.fabric(sleeve)
        sk.fabric(mirror_x(sleeve))
    if spec.sleeve == "sleeveless":
        right = [(0.18, top + 0.02), (0.2, top + 0.2), (w, top + 0.34)]
    else:
        right = [(w + 0.03, top + 0.08), (w, top + 0.34)]
    right += [(0.24, waist), (hem_w, hem)]
    nw = 0.12
    sk.fabric([(-nw, top)] + mirror_x(right) + right[::-1] + [(nw, top), (0.0, top + 0.2)])
    sk.seam([(-0.24, waist), (0.24, waist)])
    for k in (-1, 0, 1):
        sk.seam([(0.12 * k, waist + 0.08), (0.34 * k * hem_w / 0.6, hem - 0.04)], shade(sk.edge, 1.15))


def draw_skirt(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Skirts: a waistband and a trapezoid whose hem sets mini / midi / maxi."""
    hem, hem_w = SKIRT_HEM[spec.length or "midi"]
    sk.shift(0, (0.95 - hem) / 2)
    sk.fabric([(-0.34, -0.76), (0.34, -0.76), (0.34, -0.64), (-0.34, -0.64)])
    sk.fabric([(-0.34, -0.64), (0.34, -0.64), (hem_w, hem), (-hem_w, hem)])
    for k in (-2, -1, 1, 2):
        sk.seam([(0.12 * k, -0.6), (0.24 * k * hem_w / 0.6, hem - 0.03)], shade(sk.edge, 1.15))


def draw_bottoms(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Jeans, trousers, shorts: two legs whose hem is full length or above the knee."""
    shorts = spec.article == "Shorts"
    slim = spec.fit in ("Slim Fit", "Skinny Fit")
    wa, waist, crotch = (0.36 if slim else 0.4), -0.92, -0.3
    hip = wa + 0.04
    hem = 0.08 if shorts else 0.95
    ox, ix = (hip + 0.03, 0.04) if shorts else ((0.3, 0.1) if spec.fit == "Skinny Fit" else (0.34, 0.08) if slim else (0.4, 0.06))
    if shorts:
        sk.shift(0, 0.42)
    sk.fabric([(-wa, waist), (wa, waist), (hip, -0.5), (ox, hem), (ix, hem), (0.0, crotch), (-ix, hem), (-ox, hem), (-hip, -0.5)])
    sk.seam([(-wa, waist + 0.1), (wa, waist + 0.1)])
    for x in (-0.28, -0.06, 0.16, 0.3):
        sk.line([(x, waist), (x, waist + 0.11)], sk.edge, 0.03)
    sk.seam([(0.05, waist + 0.1), (0.06, -0.45), (0.0, crotch - 0.02)])
    if spec.article == "Jeans":
        thread = (206, 150, 62)
        for side in (-1, 1):
            sk.seam(bezier((side * 0.2, waist + 0.1), (side * 0.22, -0.62), (side * hip, -0.62), 4), thread)
            sk.seam([(side * (ox - 0.02), hem - 0.06), (side * (ix + 0.02), hem - 0.06)], thread)
    elif spec.article == "Trousers":
        for side in (-1, 1):
            sk.seam([(side * (wa + ix) / 2, waist + 0.12), (side * (ox + ix) / 2, hem)])
    else:
        for side in (-1, 1):
            sk.seam([(side * (ox - 0.01), hem - 0.08), (side * (ix + 0.01), hem - 0.08)])


def draw_shoe(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Casual, sports and formal shoes in side view: flat upper on a sole of the second colour."""
    sole_colour = COLOURS[spec.second] if spec.second else shade(sk.base, 0.45)
    ink = contrast_ink(sk.base)
    if spec.style == "formal":
        sk.fabric([(-0.88, 0.22), (-0.86, -0.14), (-0.62, -0.22), (-0.38, -0.16), (-0.1, -0.22), (0.3, -0.12), (0.72, 0.02), (0.96, 0.16), (0.92, 0.24)])
        sk.solid([(-0.9, 0.22), (0.94, 0.22), (0.9, 0.3), (-0.55, 0.3), (-0.57, 0.4), (-0.88, 0.4)], sole_colour)
        sk.seam([(-0.6, -0.2), (-0.3, -0.12), (-0.1, -0.2)])
        for k in range(3):
            sk.line([(-0.14 + 0.08 * k, -0.2 + 0.03 * k), (-0.06 + 0.08 * k, -0.1 + 0.03 * k)], shade(sk.base, 0.6), 0.025)
        sk.ellipse(0.68, 0.04, 0.06, mix(sk.base, (255, 255, 255), 0.35))
        return
    thick = 0.24 if spec.style == "sports" else 0.14
    ground = 0.38
    st = ground - thick
    sk.fabric([(-0.92, st), (-0.9, -0.22), (-0.78, -0.34), (-0.5, -0.3), (-0.25, -0.36), (-0.12, -0.46),
               (0.02, -0.36), (0.45, -0.12), (0.82, 0.0), (0.95, st - 0.02)])
    sk.solid([(-0.93, st), (0.9, st), (0.97, st + thick * 0.5), (0.92, ground), (-0.9, ground), (-0.96, st + thick * 0.5)], sole_colour)
    for k in range(4):
        x, y = -0.2 + 0.13 * k, -0.32 + 0.06 * k
        sk.line([(x, y), (x + 0.08, y + 0.1)], ink, 0.035)
    if spec.style == "sports":
        sk.solid([(-0.62, 0.02), (0.22, -0.2), (0.3, -0.1), (-0.55, 0.1)], sole_colour)
        sk.solid([(-0.92, -0.2), (-0.8, -0.3), (-0.74, 0.0), (-0.9, 0.05)], sole_colour)
        sk.seam([(-0.9, st + thick * 0.5), (0.94, st + thick * 0.5)], shade(sole_colour, 0.8))
    else:
        sk.seam(bezier((0.55, st), (0.5, -0.12), (0.68, -0.05), 4))


def draw_heel(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Heels (stiletto or block) and flats: the heel, or its absence, is the visible attribute."""
    sole = shade(sk.base, 0.5)
    if spec.style == "flat":
        sk.shift(0, -0.16, 1.1)
        sk.fabric([(-0.9, 0.28), (-0.9, -0.06), (-0.78, -0.14), (-0.45, -0.04), (0.0, 0.0), (0.2, -0.1), (0.6, -0.04), (0.88, 0.1), (0.95, 0.26), (0.9, 0.3)])
        sk.solid([(-0.9, 0.28), (0.93, 0.28), (0.9, 0.34), (-0.88, 0.34)], sole)
        sk.solid([(0.12, -0.08), (0.26, -0.15), (0.26, -0.01)], shade(sk.base, 0.75))
        sk.solid([(0.28, -0.08), (0.14, -0.15), (0.14, -0.01)], shade(sk.base, 0.75))
        return
    sk.fabric([(-0.78, -0.42), (-0.62, -0.36), (-0.4, -0.05), (0.1, 0.22), (0.5, 0.28), (0.82, 0.4), (0.95, 0.55), (0.9, 0.6),
               (0.42, 0.6), (0.02, 0.44), (-0.42, 0.06), (-0.8, -0.12)])
    sk.line([(0.9, 0.6), (0.42, 0.6), (0.02, 0.44), (-0.42, 0.06), (-0.8, -0.12)], sole, 0.04)
    if spec.style == "stiletto":
        sk.fabric([(-0.8, -0.12), (-0.64, -0.06), (-0.66, 0.6), (-0.71, 0.6)])
    else:
        sk.fabric([(-0.82, -0.12), (-0.52, -0.02), (-0.56, 0.6), (-0.78, 0.6)])


def draw_sandal(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Sandals in side view: straps of the base colour over a flat or heeled sole."""
    sole_colour = mix(sk.base, (150, 110, 70), 0.55)
    if spec.style == "heeled":
        path = [(-0.8, -0.1), (-0.4, 0.08), (0.05, 0.45), (0.9, 0.52)]
        sk.fabric([(-0.82, -0.08), (-0.55, 0.0), (-0.58, 0.6), (-0.78, 0.6)])
    else:
        path = [(-0.92, 0.3), (0.92, 0.3)]
        sk.shift(0, -0.1, 1.05)
    for t0, t1, height in ((0.0, 0.18, 0.7), (0.3, 0.6, 0.56), (0.64, 0.94, 0.4)):
        a, b = along(path, t0), along(path, t1)
        mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
        outer = bezier(a, (mid[0], mid[1] - 2 * height), b, 8)
        inner = bezier(b, (mid[0], mid[1] - 2 * (height - 0.2)), a, 8)
        sk.fabric(outer + inner[1:-1])
    sk.line(path, sole_colour, 0.14)


def draw_flipflop(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Flip flops from above, as a pair: base-colour soles with V straps of the second colour."""
    strap = COLOURS[spec.second] if spec.second else contrast_ink(sk.base)
    for side in (-1, 1):
        cx = side * 0.44
        sole = [(cx + 0.3 * math.cos(a) * (0.82 if math.sin(a) > 0 else 1.0), 0.86 * math.sin(a) + 0.02)
                for a in (math.radians(15 * k) for k in range(24))]
        sk.fabric(sole)
        sk.line([(cx - 0.26, -0.02), (cx, -0.56), (cx + 0.26, -0.02)], strap, 0.09)
        sk.ellipse(cx, -0.56, 0.05, shade(strap, 0.8))


def draw_bag(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Backpacks and handbags (tote, satchel, shoulder): body, handles or straps, flap, zips."""
    handle = shade(sk.base, 0.72) if luminance(sk.base) >= 50 else mix(sk.base, (255, 255, 255), 0.2)
    trim = COLOURS[spec.second] if spec.second else None
    metal = METALS["gold" if luminance(sk.base) < 120 else "silver"]
    if spec.article == "Backpacks":
        sk.line([(-0.15, -0.66), (-0.13, -0.9), (0.13, -0.9), (0.15, -0.66)], handle, 0.06)
        for side in (-1, 1):
            sk.solid([(side * 0.56, -0.55), (side * 0.68, -0.5), (side * 0.7, 0.62), (side * 0.56, 0.66)], handle)
        sk.fabric(rounded_rect(-0.58, -0.72, 0.58, 0.88, 0.26))
        pocket = rounded_rect(-0.42, 0.16, 0.42, 0.76, 0.12)
        if trim is not None and spec.pattern == "solid":
            sk.solid(pocket, trim)
        else:
            sk.fabric(pocket)
        sk.line(arc(0.0, -0.1, 0.5, 0.5, 200, 340, 8), shade(sk.base, 0.55), 0.025)
        sk.line([(-0.36, 0.24), (0.36, 0.24)], trim or shade(sk.base, 0.55), 0.03)
        sk.line([(0.2, 0.24), (0.24, 0.36)], metal, 0.04)
        return
    if spec.style == "tote":
        for dx in (-0.04, 0.04):
            sk.line(bezier((-0.36 + dx, -0.18), (dx, -1.05), (0.36 + dx, -0.18), 8), handle, 0.055)
        sk.fabric([(-0.62, -0.22), (0.62, -0.22), (0.8, 0.74), (-0.8, 0.74)])
        if trim is not None:
            sk.solid([(-0.62, -0.22), (0.62, -0.22), (0.64, -0.1), (-0.64, -0.1)], trim)
    elif spec.style == "satchel":
        sk.line(bezier((-0.3, -0.28), (0.0, -1.0), (0.3, -0.28), 8), handle, 0.07)
        sk.fabric(rounded_rect(-0.82, -0.3, 0.82, 0.72, 0.12))
        sk.fabric([(-0.82, -0.28), (0.82, -0.28), (0.8, 0.16), (0.12, 0.28), (-0.12, 0.28), (-0.8, 0.16)])
        sk.solid(rounded_rect(-0.08, 0.16, 0.08, 0.36, 0.03), metal)
    else:
        sk.line(bezier((-0.56, 0.06), (0.0, -1.55), (0.56, 0.06), 10), handle, 0.035)
        sk.fabric(rounded_rect(-0.64, 0.0, 0.64, 0.78, 0.2))
        sk.fabric([(-0.64, 0.02), (0.64, 0.02), (0.6, 0.4), (-0.6, 0.4)])
        sk.ellipse(0.0, 0.36, 0.05, metal)
        sk.shift(0, -0.2)


def draw_cap(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Baseball caps in side view: panelled dome, forward brim (second colour when two-tone)."""
    sk.shift(0, 0.1)
    sk.fabric(arc(-0.15, 0.2, 0.66, 0.74, 180, 360, 16))
    brim = [(0.3, 0.1), (0.7, 0.13), (0.98, 0.25), (0.9, 0.33), (0.5, 0.3), (0.26, 0.24)]
    if spec.second:
        sk.solid(brim, COLOURS[spec.second])
    else:
        sk.fabric(brim)
    for x in (-0.55, 0.2):
        sk.seam(bezier((-0.15, -0.53), (x * 0.8, -0.4), (x, 0.2), 6))
    sk.ellipse(-0.15, -0.54, 0.06, COLOURS[spec.second] if spec.second else shade(sk.base, 0.8))
    sk.seam([(-0.81, 0.14), (0.3, 0.14)])
    sk.ellipse(-0.42, -0.2, 0.025, shade(sk.base, 0.55))


def draw_watch(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Analogue watches: base-colour strap, metal case, dial of the second colour with hands."""
    dial = COLOURS[spec.second] if spec.second else (240, 240, 238)
    metal = METALS[rng.choice(tuple(METALS))]
    ink = contrast_ink(dial)
    sk.fabric([(-0.24, -0.98), (0.24, -0.98), (0.26, -0.3), (-0.26, -0.3)])
    sk.fabric([(-0.26, 0.3), (0.26, 0.3), (0.24, 0.98), (-0.24, 0.98)])
    for k in range(4):
        sk.ellipse(0.0, 0.56 + 0.1 * k, 0.025, shade(sk.base, 0.45) if luminance(sk.base) >= 50 else (90, 90, 94))
    sk.solid([(0.42, -0.07), (0.55, -0.07), (0.55, 0.07), (0.42, 0.07)], metal)
    if spec.style == "square":
        sk.solid(rounded_rect(-0.46, -0.46, 0.46, 0.46, 0.1), metal)
        sk.solid(rounded_rect(-0.37, -0.37, 0.37, 0.37, 0.06), dial)
    else:
        sk.ellipse(0.0, 0.0, 0.48, metal, outline=True)
        sk.ellipse(0.0, 0.0, 0.39, dial)
    for k in range(12):
        a = math.radians(30 * k)
        inner = 0.25 if k % 3 == 0 else 0.29
        sk.line([(0.34 * math.cos(a), 0.34 * math.sin(a)), (inner * math.cos(a), inner * math.sin(a))], ink, 0.03)
    for length, width in ((0.18, 0.045), (0.29, 0.03)):
        a = math.radians(rng.uniform(0, 360))
        sk.line([(0.0, 0.0), (length * math.cos(a), length * math.sin(a))], ink, width)


def draw_belt(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Belts coiled into a loop, with a metal buckle (gold or silver) and punched holes."""
    metal = METALS["gold" if spec.style == "gold" else "silver"]
    sk.fabric_ring(rounded_rect(-0.92, -0.4, 0.92, 0.4, 0.32), rounded_rect(-0.68, -0.16, 0.68, 0.16, 0.12))
    sk.line(rounded_rect(-0.5, -0.48, -0.22, -0.08, 0.04), metal, 0.06, closed=True)
    sk.line([(-0.36, -0.28), (-0.12, -0.28)], metal, 0.035)
    for k in range(5):
        sk.ellipse(0.02 + 0.1 * k, -0.28, 0.025, shade(sk.base, 0.4) if luminance(sk.base) >= 50 else (100, 100, 104))


def draw_sunglasses(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Sunglasses from the front: lens shape (wayfarer / aviator / round), tinted lenses, frame."""
    lens_colour = LENS_TINTS.get(spec.second or "Black", LENS_TINTS["Black"])
    if spec.style == "wayfarer":
        lens, frame_w = [(0.1, -0.3), (0.86, -0.34), (0.8, 0.06), (0.64, 0.24), (0.26, 0.24), (0.12, 0.04)], 0.1
    elif spec.style == "aviator":
        lens, frame_w = [(0.1, -0.26), (0.78, -0.3), (0.86, -0.12), (0.74, 0.22), (0.52, 0.34), (0.28, 0.26), (0.12, 0.02)], 0.04
    else:
        lens, frame_w = arc(0.46, 0.0, 0.32, 0.32, 0, 360, 20)[:-1], 0.06
    for pts in (lens, mirror_x(lens)):
        sk.solid(pts, lens_colour, outline=False)
        sk.line(pts, sk.base, frame_w, closed=True)
        sk.line([along(pts[:3], 0.3), along(pts[:3], 0.6)], mix(lens_colour, (255, 255, 255), 0.45), 0.03)
    sk.line([(-0.12, -0.14), (0.0, -0.2), (0.12, -0.14)], sk.base, 0.05)
    if spec.style == "aviator":
        sk.line([(-0.14, -0.3), (0.14, -0.3)], sk.base, 0.03)
    for side in (-1, 1):
        sk.line([(side * 0.84, -0.28), (side * 0.99, -0.24)], sk.base, frame_w)


def draw_scarf(sk: Sketch, spec: ItemSpec, rng: random.Random) -> None:
    """Scarves hung in a loop: two patterned tails with fringes."""
    fringe = shade(sk.base, 0.8) if luminance(sk.base) >= 50 else mix(sk.base, (255, 255, 255), 0.2)
    tails = ([(-0.42, -0.66), (-0.04, -0.66), (0.02, 0.76), (-0.38, 0.7)], [(0.0, -0.62), (0.42, -0.62), (0.46, 0.86), (0.08, 0.86)])
    for tail in tails:
        sk.fabric(tail)
        (x0, y0), (x1, y1) = tail[3], tail[2]
        for k in range(9):
            x = x0 + (x1 - x0) * (k + 0.5) / 9
            y = y0 + (y1 - y0) * (k + 0.5) / 9
            sk.line([(x, y), (x, y + 0.1)], fringe, 0.015)
    sk.fabric([(-0.44, -0.92), (0.44, -0.92), (0.36, -0.58), (-0.36, -0.58)])
    sk.seam([(-0.2, -0.55), (-0.18, 0.55)])


DRAWERS: dict[str, Callable[[Sketch, ItemSpec, random.Random], None]] = {
    "top": draw_top, "dress": draw_dress, "skirt": draw_skirt, "bottoms": draw_bottoms, "shoe": draw_shoe, "heel": draw_heel,
    "sandal": draw_sandal, "flipflop": draw_flipflop, "bag": draw_bag, "cap": draw_cap, "watch": draw_watch,
    "belt": draw_belt, "sunglasses": draw_sunglasses, "scarf": draw_scarf,
}


def render_scale(image_size: int) -> int:
    """Supersampling factor: 4x for small images, 2x for large (antialiasing without slowness)."""
    return max(2, min(4, 256 // image_size))


def render_item(spec: ItemSpec, image_size: int) -> Image.Image:
    """Draw one product at 2-4x and downsample with LANCZOS to an ``image_size`` RGB square."""
    rng = random.Random(spec.seed)
    size = image_size * render_scale(image_size)
    background = tuple(max(0, min(255, v + rng.randint(-5, 5))) for v in rng.choice(BACKGROUNDS))
    pen = Pen(size * (0.5 + rng.uniform(-0.035, 0.035)), size * (0.5 + rng.uniform(-0.035, 0.035)),
              size * 0.4 * rng.uniform(0.9, 1.04), rng.uniform(-6.0, 6.0), rng.random() < 0.5)
    base = COLOURS[spec.base]
    sketch = Sketch(size, pen, base)
    period = size / rng.uniform(6.5, 8.0) if spec.pattern in ("dotted", "floral") else size / rng.uniform(7.0, 9.0)
    phase = rng.uniform(0, period)
    DRAWERS[ARTICLE_BY_NAME[spec.article].family](sketch, spec, rng)
    image = Image.new("RGB", (size, size), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    if sketch.mask.getbbox():
        second = COLOURS[spec.second] if spec.second and spec.pattern != "solid" else None
        fabric = pattern_fill(size, spec.pattern, base, second, period, phase, vertical=spec.article == "Shirts")
        image.paste(fabric, (0, 0), sketch.mask)
    for op in sketch.over:
        op(draw)
    return image.resize((image_size, image_size), Image.LANCZOS)
