"""Sampling a product's spec and composing the title that describes it."""

from __future__ import annotations

import random
from typing import Sequence

from lightclip.data.synth.drawing import colour_distance
from lightclip.data.synth.vocabulary import APPAREL_BRANDS, ARTICLES, ARTICLE_BY_NAME, BRANDS, COLOURS, COLOUR_WEIGHTS, FOOTWEAR_BRANDS, ItemSpec, LENS_TINTS


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
