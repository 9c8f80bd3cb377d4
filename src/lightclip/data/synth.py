"""The embedded synthetic fashion catalogue: drawn products with titles that describe them.

The project must train, evaluate and demo without downloading anything, so it ships a small
deterministic "shop" instead of a data set. Every product is drawn with PIL (no fonts, no
noise) and every fine attribute its title names (second colour, pattern, sleeve, length, heel,
lens shape, ...) is visible in its image, so retrieval has to look past type and colour.

Same seed and config give byte-identical files; bump :data:`SYNTH_VERSION` whenever the
rendering or sampling changes so that cached catalogues are known to be stale.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw
from tqdm import tqdm

from lightclip.config import SynthConfig
from lightclip.data.catalogue import CATALOGUE_FILE, Catalogue, CatalogueError, new_catalogue
from lightclip.io import staged_dir

#: Bump whenever rendering, sampling or titles change (cached catalogues become stale).
SYNTH_VERSION = 1

RGB = tuple[int, int, int]
Point = tuple[float, float]

#: Fixed RGB per colour name; every name is in params.yaml's ``validate.allowed_values.baseColour``.
COLOURS: dict[str, RGB] = {
    "Black": (24, 24, 27),
    "White": (248, 248, 246),
    "Navy Blue": (30, 42, 94),
    "Blue": (38, 98, 206),
    "Red": (204, 32, 40),
    "Green": (34, 139, 64),
    "Grey": (128, 128, 132),
    "Pink": (241, 133, 176),
    "Yellow": (246, 206, 46),
    "Brown": (112, 70, 40),
    "Purple": (112, 52, 148),
    "Beige": (216, 196, 160),
    "Maroon": (116, 22, 40),
    "Olive": (110, 116, 44),
    "Orange": (242, 122, 28),
    "Teal": (0, 128, 128),
}
#: Rough popularity, so that many products share a colour (as in real catalogues).
COLOUR_WEIGHTS: dict[str, int] = {
    "Black": 10, "White": 8, "Blue": 8, "Navy Blue": 7, "Grey": 6, "Red": 6, "Green": 4, "Pink": 4,
    "Brown": 3, "Purple": 3, "Yellow": 3, "Beige": 3, "Maroon": 3, "Olive": 2, "Orange": 2, "Teal": 2,
}
#: Sunglass lens tints: darker than the named colour, as real lenses are.
LENS_TINTS: dict[str, RGB] = {"Black": (34, 34, 38), "Brown": (92, 58, 34), "Green": (38, 72, 46), "Blue": (34, 56, 104)}
METALS: dict[str, RGB] = {"silver": (198, 198, 204), "gold": (206, 166, 62), "gunmetal": (72, 72, 78)}
BACKGROUNDS: tuple[RGB, ...] = ((240, 240, 240), (236, 233, 228), (232, 236, 240), (242, 238, 232))

SEASONS = ("Summer", "Winter", "Fall", "Spring")
WARM = ("Summer", "Summer", "Spring", "Fall")
COLD = ("Winter", "Winter", "Fall", "Spring")

APPAREL_BRANDS = (
    "Harbor Lane", "Urban Loom", "Cotton Crest", "Northwind", "Maple Row", "Kite Street", "Velvet Fig",
    "Tara Rose", "Brick & Thread", "Indigo Reef", "Sol & Sand", "Aster Bloom", "Oakhurst", "Mira Kaur",
)
FOOTWEAR_BRANDS = ("Stride Lab", "Peakline", "Metro Stride", "Trailmark", "Solewise", "Kestrel", "Oakhurst")
#: Accessory brands by drawing family (a watch brand does not sell backpacks).
BRANDS: dict[str, tuple[str, ...]] = {
    "bag": ("Carry Co", "Nomad Pack", "Urban Loom", "Velvet Fig", "Trailmark"),
    "watch": ("Lumen Time", "Tempo", "Oakhurst", "Northwind"),
    "sunglasses": ("Sable Optics", "Sunward", "Kite Street"),
    "cap": ("Peakline", "Kite Street", "Urban Loom", "Stride Lab"),
    "belt": ("Oakhurst", "Brick & Thread", "Harbor Lane", "Carry Co"),
    "scarf": ("Tara Rose", "Velvet Fig", "Aster Bloom", "Mira Kaur"),
}


@dataclass(frozen=True)
class ArticleType:
    """One Kaggle-style article type: its labels, drawing family and plausible attribute values.

    Tuples with repeated values act as weights (``("Men", "Men", "Women")``).
    """

    name: str
    master: str
    sub: str
    family: str
    weight: float
    genders: tuple[str, ...]
    usages: tuple[str, ...]
    nouns: tuple[str, ...] = ()
    seasons: tuple[str, ...] = SEASONS
    patterns: tuple[str, ...] = ("solid",)
    colours: dict[str, int] | None = None
    sleeves: tuple[str, ...] = ()
    lengths: tuple[str, ...] = ()
    fits: tuple[str, ...] = ()
    styles: tuple[str, ...] = ()
    second_prob: float = 0.0  # chance of a named second colour on a solid item (trim, sole, dial)
    second_palette: tuple[str, ...] | None = None


ARTICLES: tuple[ArticleType, ...] = (
    ArticleType("Tshirts", "Apparel", "Topwear", "top", 14, ("Men",) * 4 + ("Women", "Women", "Boys", "Girls", "Unisex"),
                ("Casual",) * 3 + ("Sports",), ("T-shirt", "Tshirt", "Tee", "T-Shirt"),
                patterns=("solid",) * 3 + ("striped", "striped", "dotted"), sleeves=("short",) * 3 + ("long", "sleeveless"),
                fits=("Slim Fit", "Regular Fit"), styles=("round", "round", "vneck")),
    ArticleType("Shirts", "Apparel", "Topwear", "top", 11, ("Men",) * 4 + ("Women", "Boys"),
                ("Casual", "Casual", "Formal", "Formal", "Smart Casual", "Party"), ("Shirt",),
                patterns=("solid", "solid", "striped", "striped", "checked", "checked", "checked", "dotted"),
                sleeves=("long", "long", "short"), fits=("Slim Fit", "Regular Fit")),
    ArticleType("Tops", "Apparel", "Topwear", "top", 7, ("Women",) * 4 + ("Girls",), ("Casual", "Casual", "Party"), ("Top",),
                patterns=("solid", "solid", "striped", "dotted", "floral", "floral", "checked"),
                sleeves=("sleeveless", "short", "long"), styles=("round", "vneck")),
    ArticleType("Sweaters", "Apparel", "Topwear", "top", 4, ("Men", "Men", "Women", "Women", "Boys", "Girls"), ("Casual",),
                ("Sweater", "Pullover", "Jumper"), seasons=COLD, patterns=("solid", "solid", "striped"),
                sleeves=("long",), styles=("round", "vneck")),
    ArticleType("Jackets", "Apparel", "Topwear", "top", 4, ("Men", "Men", "Men", "Women", "Women", "Unisex"),
                ("Casual", "Casual", "Sports", "Travel"), ("Jacket", "Jacket", "Zip-Up Jacket"), seasons=COLD,
                patterns=("solid", "solid", "solid", "checked"), sleeves=("long",)),
    ArticleType("Kurtas", "Apparel", "Topwear", "top", 5, ("Women", "Women", "Women", "Men", "Men"), ("Ethnic",), ("Kurta",),
                patterns=("solid", "solid", "floral", "floral", "striped", "dotted"), sleeves=("short", "long")),
    ArticleType("Dresses", "Apparel", "Dress", "dress", 7, ("Women",) * 4 + ("Girls",), ("Casual", "Casual", "Party", "Party"),
                ("Dress",), patterns=("solid", "solid", "floral", "floral", "dotted", "dotted", "striped", "checked"),
                sleeves=("sleeveless", "sleeveless", "short", "short", "long"), lengths=("mini", "midi", "maxi"),
                styles=("", "", "A-Line", "Fit and Flare")),
    ArticleType("Skirts", "Apparel", "Bottomwear", "skirt", 4, ("Women", "Women", "Women", "Girls"), ("Casual", "Casual", "Party"),
                ("Skirt",), patterns=("solid", "solid", "floral", "dotted", "striped", "checked"),
                lengths=("mini", "midi", "maxi"), styles=("", "", "A-Line", "Flared")),
    ArticleType("Jeans", "Apparel", "Bottomwear", "bottoms", 7, ("Men", "Men", "Men", "Women", "Women", "Boys"), ("Casual",),
                ("Jeans",), colours={"Blue": 8, "Navy Blue": 5, "Black": 4, "Grey": 2},
                fits=("Slim Fit", "Skinny Fit", "Regular Fit")),
    ArticleType("Trousers", "Apparel", "Bottomwear", "bottoms", 5, ("Men", "Men", "Men", "Women", "Women"),
                ("Formal", "Formal", "Casual", "Smart Casual"), ("Trousers", "Trousers", "Chinos"),
                patterns=("solid",) * 4 + ("checked",), fits=("Slim Fit", "Regular Fit"),
                colours={"Black": 5, "Navy Blue": 4, "Grey": 4, "Beige": 3, "Brown": 2, "Olive": 2, "Blue": 1}),
    ArticleType("Shorts", "Apparel", "Bottomwear", "bottoms", 5, ("Men", "Men", "Men", "Women", "Boys", "Girls"),
                ("Casual", "Casual", "Sports"), ("Shorts",), seasons=WARM,
                patterns=("solid", "solid", "solid", "striped", "checked")),
    ArticleType("Casual Shoes", "Footwear", "Shoes", "shoe", 8, ("Men", "Men", "Men", "Women", "Women", "Unisex"), ("Casual",),
                ("Casual Shoes", "Sneakers"), styles=("casual",), second_prob=1.0,
                second_palette=("White", "Black", "Beige", "Brown", "Grey")),
    ArticleType("Sports Shoes", "Footwear", "Shoes", "shoe", 7, ("Men", "Men", "Men", "Women", "Women", "Unisex"), ("Sports",),
                ("Sports Shoes", "Running Shoes", "Training Shoes"), styles=("sports",), second_prob=1.0),
    ArticleType("Formal Shoes", "Footwear", "Shoes", "shoe", 3, ("Men",), ("Formal",), ("Formal Shoes", "Derbys", "Oxfords"),
                colours={"Black": 5, "Brown": 4, "Maroon": 1}, styles=("formal",)),
    ArticleType("Heels", "Footwear", "Shoes", "heel", 5, ("Women",), ("Party", "Party", "Casual", "Formal"),
                styles=("stiletto", "block")),
    ArticleType("Flats", "Footwear", "Shoes", "heel", 3, ("Women", "Women", "Women", "Girls"), ("Casual",),
                ("Flats", "Ballerinas", "Ballet Flats"), styles=("flat",)),
    ArticleType("Sandals", "Footwear", "Sandal", "sandal", 4, ("Men", "Men", "Women", "Women"), ("Casual",), seasons=WARM,
                styles=("flat", "heeled")),
    ArticleType("Flip Flops", "Footwear", "Flip Flops", "flipflop", 4, ("Men", "Men", "Women", "Women", "Unisex"), ("Casual",),
                ("Flip Flops", "Flip-Flops"), seasons=WARM, second_prob=1.0),
    ArticleType("Handbags", "Accessories", "Bags", "bag", 6, ("Women",), ("Casual", "Casual", "Party", "Formal"),
                patterns=("solid",) * 4 + ("checked", "dotted", "striped"), styles=("tote", "satchel", "shoulder")),
    ArticleType("Backpacks", "Accessories", "Bags", "bag", 4, ("Unisex", "Unisex", "Unisex", "Men", "Women"), ("Casual", "Travel"),
                ("Backpack", "Backpack", "Laptop Backpack"), patterns=("solid",) * 3 + ("striped", "checked"), second_prob=0.5),
    ArticleType("Caps", "Accessories", "Headwear", "cap", 3, ("Unisex", "Unisex", "Men"), ("Casual", "Sports"),
                ("Cap", "Baseball Cap"), second_prob=0.5),
    ArticleType("Watches", "Accessories", "Watches", "watch", 6, ("Men", "Men", "Women", "Women", "Unisex"), ("Casual", "Formal"),
                ("Watch", "Analogue Watch"), colours={"Black": 5, "Brown": 5, "Navy Blue": 2, "White": 2, "Pink": 1, "Maroon": 1},
                styles=("round", "round", "square"), second_prob=1.0,
                second_palette=("White", "Black", "Blue", "Navy Blue", "Grey", "Beige", "Green")),
    ArticleType("Belts", "Accessories", "Belts", "belt", 3, ("Men", "Men", "Men", "Women"), ("Casual", "Formal"),
                ("Belt", "Leather Belt"), colours={"Black": 5, "Brown": 5, "Maroon": 1, "Navy Blue": 1, "Beige": 1},
                styles=("gold", "silver")),
    ArticleType("Sunglasses", "Accessories", "Eyewear", "sunglasses", 4, ("Men", "Men", "Women", "Women", "Unisex", "Unisex"),
                ("Casual", "Casual", "Travel"), seasons=WARM,
                colours={"Black": 6, "Brown": 3, "Red": 1, "Blue": 1, "White": 1, "Pink": 1},
                styles=("wayfarer", "aviator", "round"), second_prob=1.0, second_palette=tuple(LENS_TINTS)),
    ArticleType("Scarves", "Accessories", "Scarves", "scarf", 3, ("Women", "Women", "Women", "Unisex"), ("Casual", "Ethnic"),
                ("Scarf", "Stole", "Scarf"), patterns=("solid", "striped", "checked", "checked", "dotted", "floral")),
)
ARTICLE_BY_NAME: dict[str, ArticleType] = {a.name: a for a in ARTICLES}


@dataclass(frozen=True)
class ItemSpec:
    """Everything that decides one product's image and title (the title adds only wording)."""

    id: str
    article: str
    gender: str
    base: str
    second: str | None
    pattern: str  # solid | striped | checked | dotted | floral
    sleeve: str | None  # sleeveless | short | long
    length: str | None  # mini | midi | maxi
    fit: str | None
    style: str | None
    brand: str
    season: str
    usage: str
    year: int
    seed: int


# --- colours -------------------------------------------------------------------------------


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


# --- drawing: one function per silhouette family ------------------------------------------


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


# --- sampling and titles -------------------------------------------------------------------


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def pick_second(rng: random.Random, base: str, palette: Sequence[str] | None, min_distance: float = 140.0) -> str:
    """A second colour that contrasts with the base, so patterns and trims stay visible."""
    names = [n for n in (palette or COLOURS) if n != base]
    if palette is not None and set(names) <= set(LENS_TINTS):
        return rng.choice(names)
    far = [n for n in names if colour_distance(COLOURS[n], COLOURS[base]) >= min_distance]
    if not far:
        return max(names, key=lambda n: colour_distance(COLOURS[n], COLOURS[base]))
    return _weighted(rng, {n: COLOUR_WEIGHTS[n] for n in far})


def sample_spec(rng: random.Random, item_id: str) -> ItemSpec:
    """Draw one product's attributes from the article table (plausible per type)."""
    art = rng.choices(ARTICLES, weights=[a.weight for a in ARTICLES])[0]
    gender = rng.choice(art.genders)
    base = _weighted(rng, art.colours or COLOUR_WEIGHTS)
    pattern = rng.choice(art.patterns)
    style = rng.choice(art.styles) if art.styles else None
    if art.name == "Sandals" and gender not in ("Women", "Girls"):
        style = "flat"
    second = None
    if pattern != "solid" or rng.random() < art.second_prob:
        second = pick_second(rng, base, art.second_palette, 130.0 if art.second_palette else 140.0)
    family_brands = BRANDS.get(art.family) or (FOOTWEAR_BRANDS if art.master == "Footwear" else APPAREL_BRANDS)
    return ItemSpec(
        id=item_id,
        article=art.name,
        gender=gender,
        base=base,
        second=second,
        pattern=pattern,
        sleeve=rng.choice(art.sleeves) if art.sleeves else None,
        length=rng.choice(art.lengths) if art.lengths else None,
        fit=rng.choice(art.fits) if art.fits else None,
        style=style,
        brand=rng.choice(family_brands),
        season=rng.choice(art.seasons),
        usage=rng.choice(art.usages),
        year=rng.randint(2010, 2020),
        seed=rng.getrandbits(32),
    )


#: Families whose title may say "Solid"/"Plain" (on a shoe or watch it reads oddly).
FABRIC_FAMILIES = frozenset({"top", "dress", "skirt", "bottoms", "bag", "scarf"})
PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("Solid", "Solid", "Plain", "", "", ""),
    "striped": ("Striped", "Striped", "Stripe"),
    "checked": ("Checked", "Checked", "Check", "Checkered"),
    "dotted": ("Polka Dot", "Polka Dot", "Dotted", "Polka-Dot"),
    "floral": ("Floral", "Floral Print", "Floral Printed"),
}
PATTERN_SUFFIX: dict[str, str] = {"striped": "Stripes", "checked": "Checks", "dotted": "Polka Dots", "floral": "Floral Print"}
GENDER_WORDS: dict[str, tuple[str, ...]] = {
    "Men": ("Men", "Men", "Men's"), "Women": ("Women", "Women", "Women's"), "Boys": ("Boys",), "Girls": ("Girls",), "Unisex": ("Unisex",),
}
SLEEVE_WORDS: dict[str, tuple[str, ...]] = {
    "sleeveless": ("Sleeveless",), "short": ("Short Sleeve", "Half Sleeve", "Short Sleeves"), "long": ("Long Sleeve", "Full Sleeve", "Long Sleeves"),
}
LENGTH_WORDS: dict[str, tuple[str, ...]] = {"mini": ("Mini",), "midi": ("Midi",), "maxi": ("Maxi",)}


def _describe(spec: ItemSpec, rng: random.Random) -> tuple[list[str], str, list[str]]:
    """Type-specific words: (descriptors before the noun, the noun, "with ..." phrases after it)."""
    art = ARTICLE_BY_NAME[spec.article]
    noun = rng.choice(art.nouns) if art.nouns else spec.article
    desc: list[str] = []
    suffix: list[str] = []
    if spec.fit and rng.random() < 0.5:
        desc.append(spec.fit)
    if spec.style == "vneck" and rng.random() < 0.7:
        desc.append(rng.choice(("V-Neck", "V Neck")))
    elif spec.style == "round" and spec.article == "Tshirts" and rng.random() < 0.4:
        desc.append("Round Neck")
    if spec.length:
        desc.append(rng.choice(LENGTH_WORDS[spec.length]))
    if spec.article in ("Dresses", "Skirts") and spec.style and rng.random() < 0.6:
        desc.append(spec.style)
    if spec.sleeve and (spec.article not in ("Sweaters", "Jackets") or rng.random() < 0.2):
        if spec.sleeve != "sleeveless" and rng.random() < 0.35:
            suffix.append(f"{spec.sleeve.title()} Sleeves")
        elif rng.random() < 0.9:
            desc.append(rng.choice(SLEEVE_WORDS[spec.sleeve]))
    if spec.article == "Shirts" and spec.usage in ("Casual", "Formal", "Party") and rng.random() < 0.5:
        desc.append(spec.usage)
    if spec.article == "Heels":
        noun = rng.choice(("Stilettos", "Stiletto Heels", "Stiletto Pumps") if spec.style == "stiletto" else ("Block Heels", "Block Heel Pumps"))
    elif spec.article == "Sandals":
        noun = "Heeled Sandals" if spec.style == "heeled" else rng.choice(("Sandals", "Flat Sandals"))
    elif spec.article == "Handbags":
        noun = {"tote": ("Tote Bag", "Tote"), "satchel": ("Satchel", "Handbag", "Satchel Bag"), "shoulder": ("Shoulder Bag", "Sling Bag")}[spec.style or "tote"]
        noun = rng.choice(noun)
    elif spec.article == "Sunglasses":
        noun = f"{spec.style.title() if spec.style else ''} Sunglasses".strip()
        if spec.second and rng.random() < 0.6:
            suffix.append(f"{spec.second} Lenses")
    elif spec.article == "Watches":
        if spec.second:
            dial = f"{spec.second} Square Dial" if spec.style == "square" and rng.random() < 0.6 else f"{spec.second} Dial"
            suffix.append(dial)
    elif spec.article == "Belts" and rng.random() < 0.6:
        suffix.append(f"{spec.style.title() if spec.style else 'Silver'}-Toned Buckle")
    return desc, noun, suffix


def compose_title(spec: ItemSpec, rng: random.Random) -> str:
    """A catalogue-style title naming what the image shows, in varied order and wording."""
    desc, noun, suffix = _describe(spec, rng)
    named_second = spec.second if spec.article not in ("Sunglasses", "Watches") else None
    fabric_family = ARTICLE_BY_NAME[spec.article].family in FABRIC_FAMILIES
    pattern_words = PATTERN_WORDS[spec.pattern] if fabric_family else ("",)
    if spec.pattern != "solid" and named_second and rng.random() < 0.15:
        colours, pattern = spec.base, ""
        suffix.insert(0, f"{named_second} {PATTERN_SUFFIX[spec.pattern]}")
    else:
        colours = f"{spec.base} {rng.choice(('&', '&', 'and'))} {named_second}" if named_second else spec.base
        pattern = rng.choice(pattern_words)
    brand = spec.brand if rng.random() < 0.85 else ""
    gender = rng.choice(GENDER_WORDS[spec.gender])
    order = rng.random()
    if order < 0.55:
        words = [brand, gender, colours, pattern, *desc, noun]
    elif order < 0.75:
        words = [brand, gender, *desc, colours, pattern, noun]
    elif order < 0.9 and spec.gender != "Unisex":
        words = [brand, colours, pattern, *desc, noun, "for", spec.gender]
    else:
        words = [brand, gender, pattern, colours, *desc, noun]
    if suffix:
        words += ["with", " and ".join(suffix)]
    return " ".join(w for w in words if w)


# --- writing the catalogue -----------------------------------------------------------------

#: What a previous catalogue directory may hold; anything else is a user's file and is kept.
REPLACEABLE = frozenset({CATALOGUE_FILE, "images", "import_report.json"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})


def unexpected_entries(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` that are not part of a previous catalogue (we never delete those)."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        return [str(out_dir)]
    found: list[str] = []
    for entry in sorted(out_dir.iterdir()):
        if entry.name not in REPLACEABLE or entry.is_symlink():
            found.append(entry.name)
        elif entry.name == "images":
            if not entry.is_dir():
                found.append(entry.name)
                continue
            for image in sorted(entry.iterdir()):
                if image.is_symlink() or not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES:
                    found.append(f"images/{image.name}")
        elif not entry.is_file():
            found.append(entry.name)
    return found


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CatalogueError(f"{out_dir}: exists and is not a directory; refusing to replace it")
    found = unexpected_entries(out_dir)
    if found:
        shown = ", ".join(found[:20]) + (" ..." if len(found) > 20 else "")
        raise CatalogueError(
            f"{out_dir}: refusing to overwrite; it holds entries that are not a previous catalogue: {shown} "
            f"(only {', '.join(sorted(REPLACEABLE))} may be replaced; move them or choose another directory)"
        )


def save_png(image: Image.Image, path: Path) -> None:
    """PNG with fixed options and no metadata, so equal images give equal bytes."""
    image.save(path, format="PNG", optimize=False, compress_level=6)


def generate_catalogue(out_dir: Path, config: SynthConfig, *, progress: bool = True) -> Catalogue:
    """Render the synthetic catalogue into ``out_dir`` (images/ + catalogue.parquet).

    Deterministic in ``config``. Built in a temporary directory beside ``out_dir`` and moved in
    at the end, so a crash never leaves half a catalogue; a previous catalogue there is
    replaced, anything else makes this raise :class:`CatalogueError` before any work is done.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    width = max(5, len(str(config.n_items)))
    rng = random.Random(config.seed)
    with staged_dir(out_dir) as work:
        (work / "images").mkdir()
        records = []
        for index in tqdm(range(1, config.n_items + 1), desc="synth", unit="img", disable=not progress):
            spec = sample_spec(rng, f"s{index:0{width}d}")
            title = compose_title(spec, random.Random(f"title:{spec.seed}"))
            save_png(render_item(spec, config.image_size), work / "images" / f"{spec.id}.png")
            art = ARTICLE_BY_NAME[spec.article]
            records.append({
                "id": spec.id, "image": f"images/{spec.id}.png", "title": title, "gender": spec.gender,
                "masterCategory": art.master, "subCategory": art.sub, "articleType": art.name, "baseColour": spec.base,
                "season": spec.season, "year": spec.year, "usage": spec.usage, "split": None,
            })
        catalogue = new_catalogue(work, records)
        _check_replaceable(out_dir)  # again: someone may have added files meanwhile
    return Catalogue(root=out_dir, items=catalogue.items)
