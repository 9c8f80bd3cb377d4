"""Mine multi-granularity fashion concepts from product titles (FashionKLIP, Wang et al. 2023).

A *concept* is a phrase that ends in a product-type head noun, optionally preceded by up to
``max_modifiers`` modifiers: ``shirt`` -> ``check shirt`` -> ``navy blue check shirt``. Titles
are noun-phrase lists ("<brand> <gender> <line name> <pattern> <colour> <type> <code>"), so a
small rule-based pipeline does better than a sentence parser:

1. :func:`normalise_title` lower-cases, singularises and folds spelling variants into *units*
   (a unit may hold a space: ``navy blue``, ``flip flop``, ``slim fit``), so that ``T-Shirts``,
   ``Tshirt`` and ``tee`` all count as one head ``tshirt``.
2. Head nouns are learned from the data (the last unit of titles, frequency-filtered) plus a
   small built-in lexicon. The ``articleType`` column is never read: it is ground truth for
   evaluation only (:func:`lightclip.kg.graph.kg_quality`).
3. Brands are detected statistically: the span before a gender word that recurs as a title
   prefix, or a first unit that starts titles of several product types; neither may be a head
   or modifier. Brands, gender words and codes (units with digits) are never concepts.
4. Modifiers are the contiguous run of known modifiers right before the head (lexicon:
   colours, patterns, fits, materials, uses; plus words learned to precede several heads). They
   are put into a canonical order (colour outermost, type-defining use innermost, as in
   "navy blue check shirt", "black leather casual shoe") so that word-order variants of one
   product count as one concept, and parents drop the outermost modifier first.
5. Every title votes once for every sub-phrase of its (head, modifiers); phrases seen in at
   least ``min_count`` titles are concepts, bare heads always are.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Sequence

from lightclip.config import KGConfig
from lightclip.errors import LightclipError


class KGError(LightclipError, ValueError):
    """Knowledge-graph input or output that cannot be used; the message says what and why."""


# --------------------------------------------------------------------------------------------
# Lexicons. Small and generic on purpose: the data adds heads, brands and modifiers.
# --------------------------------------------------------------------------------------------

GENDER_WORDS: frozenset[str] = frozenset({"men", "women", "boys", "girls", "unisex", "kids", "infant", "infants", "baby", "teen", "teens"})
STOP_WORDS: frozenset[str] = frozenset(
    {"and", "with", "for", "of", "the", "a", "an", "in", "on", "by", "to", "from", "at", "or", "new", "size", "free", "xs", "s", "m", "l", "xl", "xxl", "xxxl", "pc", "pcs"}
)
#: Brands whose names look like fashion words (the stop list; normalised below like titles).
_KNOWN_BRANDS_RAW: tuple[str, ...] = (
    "united colors of benetton", "red tape", "red chief", "u s polo assn", "classic polo", "indigo nation", "lee cooper",
    "french connection", "peter england", "john players", "allen solly", "louis philippe", "van heusen",
)

_COLOURS_1 = (
    "black white blue red green grey yellow pink purple brown beige maroon orange navy olive cream khaki gold silver "
    "bronze copper teal tan magenta lavender peach burgundy rust rose mauve turquoise mustard taupe nude charcoal "
    "coffee multi metallic fuchsia violet aqua coral fluorescent neon skin camel wine mint lemon"
).split()
_COLOURS_N = (
    "navy blue", "off white", "royal blue", "sky blue", "ink blue", "turquoise blue", "sea green", "lime green", "olive green",
    "bottle green", "fluorescent green", "grey melange", "coffee brown", "mushroom brown", "rose gold", "gunmetal", "steel grey",
    "charcoal grey", "mustard yellow", "wine red",
)
_SHADES = ("light", "dark", "pale", "deep", "bright")
_PATTERNS = (
    "striped check printed solid polka dot floral graphic self design textured embroidered colourblocked patterned washed "
    "faded distressed camouflage abstract geometric paisley houndstooth herringbone tartan ribbed melange logo typography "
    "applique sequinned lace"
).split()
_PATTERNS = [p for p in _PATTERNS if p not in {"polka", "dot", "self", "design"}] + ["polka dot", "self design"]
_FIT_WORDS = ("slim", "regular", "skinny", "comfort", "relaxed", "loose", "straight", "tapered", "narrow", "tailored", "classic", "super slim", "easy", "body")
_SHAPES = (
    [f"{w} fit" for w in _FIT_WORDS]
    + ["long sleeve", "short sleeve", "sleeveless", "round neck", "v neck", "crew neck", "high neck", "polo neck", "henley", "hooded"]
    + ["midi", "maxi", "mini", "knee length", "ankle length", "full length", "cropped", "mid rise", "low rise", "high rise", "bootcut", "flared"]
    + ["peep toe", "open toe", "lace up", "slip on", "high heel", "flat"]
)
_MATERIALS = (
    "leather cotton denim linen silk wool woollen canvas suede steel stainless steel metal plastic synthetic knit fleece chiffon "
    "georgette rubber nylon polyester velvet satin crepe jute lycra mesh corduroy khadi nubuck patent"
).split()
_MATERIALS = [m for m in _MATERIALS if m != "stainless"]
_USES = (
    "casual formal semi formal sports running training walking football tennis basketball cricket outdoor ethnic party evening "
    "track innerwear boxer bikini hipster thong analogue digital chronograph dial aviator wayfarer sling laptop messenger duffel "
    "travel tote shoulder hobo mobile gladiator polo ringer muscle cargo chino jogger lounge beach swim combo gift skull "
    "baseball biker racer crew trunk tank"
).split()
_USES = [u for u in _USES if u not in {"semi", "formal", "racer"}] + ["formal", "semi formal", "racer back"]
#: Words that only restate the colour before them ("Silver-Toned", "Gold Coloured").
_COLOUR_SUFFIXES = frozenset({"toned", "tone", "coloured", "colored", "colour", "color", "shade"})

#: Modifier class rank: lower ranks stand further from the head in the canonical order.
RANK_COLOUR, RANK_PATTERN, RANK_SHAPE, RANK_MATERIAL, RANK_USE = 1, 2, 3, 4, 5
MODIFIER_LEXICON: dict[str, int] = {}
for _words, _rank in ((_COLOURS_1, RANK_COLOUR), (_COLOURS_N, RANK_COLOUR), (_PATTERNS, RANK_PATTERN), (_SHAPES, RANK_SHAPE), (_MATERIALS, RANK_MATERIAL), (_USES, RANK_USE)):
    for _w in _words:
        MODIFIER_LEXICON.setdefault(_w, _rank)
COLOURS: frozenset[str] = frozenset(w for w, r in MODIFIER_LEXICON.items() if r == RANK_COLOUR)

#: Product types known a priori; the data adds the rest (see :func:`mine_concepts`).
HEAD_LEXICON: frozenset[str] = frozenset(
    (
        "tshirt shirt top dress skirt kurta kurti tunic jeans trousers shorts pants capris leggings tights jumpsuit "
        "sweater sweatshirt hoodie jacket blazer coat suit waistcoat shrug saree dupatta stole scarf muffler glove "
        "shoe sandal heels flats slipper flip flop boot sneaker loafer sock watch sunglasses handbag bag backpack "
        "wallet clutch belt tie cap hat beanie brief trunk boxer vest bra camisole nightdress tracksuit jersey "
        "perfume deodorant cufflink necklace bracelet earring ring pendant pouch umbrella headband churidar stocking"
    ).split()
    + ["flip flop"]
)

#: Whole-token variants (before singularisation); a value may expand to several tokens.
_VARIANTS: dict[str, str] = {
    "tshirts": "tshirt", "tee": "tshirt", "tees": "tshirt", "teeshirt": "tshirt", "tshirt": "tshirt",
    "offwhite": "off white", "flipflop": "flip flop", "flipflops": "flip flop", "flops": "flop",
    "checked": "check", "checks": "check", "checkered": "check", "chequered": "check", "plaid": "check",
    "stripes": "striped", "stripe": "striped", "stripped": "striped", "stripy": "striped", "strip": "striped",
    "print": "printed", "prints": "printed", "dotted": "polka dot", "polkadot": "polka dot",
    "colourblock": "colourblocked", "colorblock": "colourblocked", "colorblocked": "colourblocked",
    "deo": "deodorant", "deos": "deodorant", "breifs": "brief", "breif": "brief",
    "mens": "men", "man": "men", "womens": "women", "woman": "women", "ladies": "women", "lady": "women",
    "boy": "boys", "girl": "girls", "kid": "kids", "analog": "analogue", "gray": "grey", "golden": "gold",
    "khakhi": "khaki", "fuschia": "fuchsia", "multicolour": "multi", "multicolor": "multi", "multicoloured": "multi",
    "woolen": "woollen", "sport": "sports", "midrise": "mid rise", "lowrise": "low rise", "highrise": "high rise",
    "hoody": "hoodie", "sneakers": "sneaker", "sweatpants": "sweat pants", "jean": "jeans", "pant": "pants",
    "trouser": "trousers", "legging": "leggings", "capri": "capris", "tight": "tights", "sunglass": "sunglasses",
    "semiformal": "semi formal", "fullsleeve": "long sleeve", "halfsleeve": "short sleeve",
}
#: Multi-unit phrases folded into one unit (matched after singularisation, longest first).
_PHRASES: dict[tuple[str, ...], str] = {
    ("t", "shirt"): "tshirt", ("tee", "shirt"): "tshirt", ("sweat", "shirt"): "sweatshirt", ("flip", "flop"): "flip flop",
    ("full", "sleeve"): "long sleeve", ("half", "sleeve"): "short sleeve", ("colour", "blocked"): "colourblocked",
    ("color", "blocked"): "colourblocked", ("gun", "metal"): "gunmetal", ("stainless", "steel"): "steel",
    ("body", "mist"): "body mist", ("lip", "gloss"): "lip gloss", ("pocket", "square"): "pocket square",
    ("night", "dress"): "nightdress", ("jump", "suit"): "jumpsuit", ("semi", "formal"): "semi formal",
    ("v", "neck"): "v neck", ("racer", "back"): "racer back",
}
for _unit in list(MODIFIER_LEXICON) + list(HEAD_LEXICON):
    if " " in _unit:
        _PHRASES.setdefault(tuple(_unit.split()), _unit)
for _shade in _SHADES:
    for _colour in _COLOURS_1:
        _PHRASES.setdefault((_shade, _colour), f"{_shade} {_colour}")
        MODIFIER_LEXICON.setdefault(f"{_shade} {_colour}", RANK_COLOUR)
_MAX_PHRASE = max(len(k) for k in _PHRASES)

#: Plural-only nouns kept as they are; irregular plurals.
_KEEP_PLURAL = frozenset({"jeans", "shorts", "pants", "trousers", "tights", "leggings", "capris", "sunglasses", "glasses", "heels", "flats", "sports", "sweatpants", "canvas", "adidas", "atlas", "christmas", "dress", "lens", "chinos", "pyjamas", "jeggings", "bermudas", "clothes", "innerwear", "kidswear", "footwear", "swimwear", "always", "plus", "mass", "cross", "boss"})
_IRREGULAR = {"scarves": "scarf", "knives": "knife", "ties": "tie", "hoodies": "hoodie", "beanies": "beanie", "cookies": "cookie", "lingeries": "lingerie", "kurtis": "kurti", "bikinis": "bikini", "dhotis": "dhoti", "salwars": "salwar"}

_TOKEN = re.compile(r"[a-z0-9]+")


def is_code(unit: str) -> bool:
    """Product codes, sizes and counts: any unit with a digit."""
    return any(ch.isdigit() for ch in unit)


def _singular(word: str) -> str:
    """English plural -> singular for catalogue nouns (rules + exceptions, no dictionary)."""
    if word in _KEEP_PLURAL or len(word) <= 3 or not word.isalpha():
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return word[:-2]
    if word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("s"):
        return word[:-1]
    return word


def normalise_title(title: str) -> list[str]:
    """Title -> units: lower case, singular, one spelling per variant; codes and words kept.

    Units may contain a space ("navy blue", "flip flop") so that a multi-word colour or type is
    one modifier or head. Gender words, brands and codes are kept here (they are boundaries
    for the modifier run); :func:`extract_concepts` drops them.
    """
    if not isinstance(title, str):
        return []
    text = title.lower().replace("&", " and ")
    text = re.sub(r"['\u2019`]s\b", "", text)
    text = re.sub(r"['\u2019`]", "", text)
    raws: list[str] = []
    for chunk in text.split():
        if is_code(chunk):  # "MTP-1234", "ED153", "3/4th": one code, not letters + numbers
            raws.append(re.sub(r"[^a-z0-9]", "", chunk))
        else:
            raws.extend(_TOKEN.findall(chunk))
    tokens: list[str] = []
    for raw in raws:
        for tok in _VARIANTS.get(raw, raw).split():
            tok = _singular(tok)
            tokens.extend(_VARIANTS.get(tok, tok).split())
    units: list[str] = []
    i = 0
    while i < len(tokens):
        for size in range(min(_MAX_PHRASE, len(tokens) - i), 1, -1):
            unit = _PHRASES.get(tuple(tokens[i : i + size]))
            if unit is not None:
                units.append(unit)
                i += size
                break
        else:
            units.append(tokens[i])
            i += 1
    units = [u for i, u in enumerate(units) if not (u in _COLOUR_SUFFIXES and i and units[i - 1] in COLOURS)]
    # "short" is an adjective ("short kurta") except as the last word ("blue short" = shorts).
    if units and units[-1] == "short":
        units[-1] = "shorts"
    return units


KNOWN_BRANDS: frozenset[str] = frozenset(" ".join(normalise_title(b)) for b in _KNOWN_BRANDS_RAW)


def is_word(unit: str) -> bool:
    """A unit that can be part of a concept: not a code, gender word, stop word or letter."""
    return not is_code(unit) and unit not in GENDER_WORDS and unit not in STOP_WORDS and len(unit) > 1


def modifier_rank(modifier: str) -> int:
    """Canonical-order class of a modifier (colour outermost ... use innermost; learned = use)."""
    return MODIFIER_LEXICON.get(modifier, RANK_USE)


def canonical_modifiers(modifiers: Iterable[str]) -> tuple[str, ...]:
    """Deduplicate and sort modifiers by class (stable), so word-order variants coincide."""
    seen: list[str] = []
    for mod in modifiers:
        if mod not in seen:
            seen.append(mod)
    return tuple(sorted(seen, key=modifier_rank))


def concept_phrase(head: str, modifiers: Sequence[str] = ()) -> str:
    """The one spelling of a concept: its (canonically ordered) modifiers, then its head."""
    return " ".join([*modifiers, head])


def generalisations(modifiers: Sequence[str], max_modifiers: int) -> list[tuple[str, ...]]:
    """Sub-sequences of ``modifiers`` (at most ``max_modifiers`` long), most specific first.

    Ties between equally long sub-sequences go to the one keeping the modifiers nearest the
    head (they define the product type: "check shirt" before "navy blue shirt"); this is the
    order in which parents and "most specific" concepts are chosen.
    """
    n = len(modifiers)
    out: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    for size in range(min(n, max_modifiers), -1, -1):
        for idx in combinations(range(n), size):
            out.append((idx, tuple(modifiers[i] for i in idx)))
    out.sort(key=lambda item: (-len(item[0]), tuple(-i for i in reversed(item[0]))))
    return [mods for _, mods in out]


# --------------------------------------------------------------------------------------------
# Config and vocabulary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """One mined concept: ``phrase`` = modifiers + head; ``count`` = titles that contain it."""

    phrase: str
    head: str
    modifiers: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class ConceptVocabulary:
    """What mining learned: heads, brands, modifiers and the concepts with their counts."""

    config: KGConfig
    heads: frozenset[str]
    brands: frozenset[str]
    modifiers: frozenset[str]
    learned_modifiers: frozenset[str]
    concepts: dict[str, Concept] = field(default_factory=dict)
    n_titles: int = 0
    n_titles_with_concept: int = 0

    def __contains__(self, phrase: object) -> bool:
        return phrase in self.concepts

    def __len__(self) -> int:
        return len(self.concepts)


# --------------------------------------------------------------------------------------------
# Parsing one title
# --------------------------------------------------------------------------------------------


_CLAUSE_BREAKS = frozenset({"with", "for"})


def main_clause(units: list[str]) -> list[str]:
    """Units before a trailing "with ..."/"for ..." clause, which names parts or buyers, not the
    product ("Belt with Gold-Toned Buckle" is a belt; "Jeans for Men" are jeans)."""
    for i, unit in enumerate(units):
        if i and unit in _CLAUSE_BREAKS:
            return units[:i]
    return units


def _strip_prefix(units: list[str], brands: frozenset[str], max_units: int) -> list[str]:
    """Drop a brand (longest match) and gender words from the start of a title."""
    for size in range(min(max_units, len(units)), 0, -1):
        if " ".join(units[:size]) in brands:
            units = units[size:]
            break
    return units


def _parse(units: list[str], heads: frozenset[str], modifiers: frozenset[str], brands: frozenset[str], cfg: KGConfig) -> tuple[str, tuple[str, ...]] | None:
    """(head, canonical modifiers) of a normalised title, or None when it names no head."""
    units = _strip_prefix(main_clause(units), brands, cfg.max_brand_units)
    for pos in range(len(units) - 1, -1, -1):
        if units[pos] in heads:
            break
    else:
        return None
    head = units[pos]
    run: list[str] = []
    for unit in reversed(units[:pos]):
        if unit in modifiers and unit != head and unit not in brands and is_word(unit):
            run.append(unit)
            if len(run) >= cfg.max_run:
                break
        else:
            break
    return head, canonical_modifiers(reversed(run))


def _candidates(head: str, modifiers: tuple[str, ...], max_modifiers: int) -> list[tuple[str, tuple[str, ...]]]:
    return [(concept_phrase(head, mods), mods) for mods in generalisations(modifiers, max_modifiers)]


# --------------------------------------------------------------------------------------------
# Learning heads, brands, modifiers
# --------------------------------------------------------------------------------------------


def _last_word(units: list[str]) -> str | None:
    for unit in reversed(units):
        if is_word(unit):
            return unit
    return None


def _learn_heads(docs: list[list[str]], cfg: KGConfig) -> frozenset[str]:
    """Heads: lexicon heads seen in the data + frequent title-final words that are not modifiers."""
    last = Counter(w for w in (_last_word(main_clause(u)) for u in docs) if w is not None)
    seen = {unit for units in docs for unit in units}
    learned = {w for w, n in last.items() if n >= cfg.min_count and w not in MODIFIER_LEXICON and w.replace(" ", "").isalpha()}
    return frozenset(learned | (HEAD_LEXICON & seen))


def _head_of(units: list[str], heads: frozenset[str]) -> str | None:
    for unit in reversed(units):
        if unit in heads:
            return unit
    return None


def _detect_brands(docs: list[list[str]], heads: frozenset[str], cfg: KGConfig) -> frozenset[str]:
    """Brands = recurring title prefixes that are never a head or modifier.

    Two kinds of evidence: the span before an early gender word ("Status Quo Men ...") that
    recurs in ``min_count`` titles, and a first word that starts titles of at least
    ``min_brand_types`` different product types. Whatever is a head or a lexicon modifier
    elsewhere (a title starting "Black Leather Wallet") is not a brand.
    """
    spans: Counter[str] = Counter()
    first: dict[str, set[str]] = defaultdict(set)
    first_count: Counter[str] = Counter()
    for units in docs:
        if not units:
            continue
        head = _head_of(units, heads)
        gender_at = next((i for i, u in enumerate(units[: cfg.max_brand_units + 1]) if u in GENDER_WORDS), None)
        if gender_at:
            span = units[:gender_at]
            while span and (span[-1] in MODIFIER_LEXICON or span[-1] in heads):
                span = span[:-1]  # "Turtle Check Men ...": the pattern belongs to the product
            if span:
                spans[" ".join(span)] += 1
        if is_word(units[0]):
            first_count[units[0]] += 1
            if head is not None:
                first[units[0]].add(head)

    def usable(phrase: str) -> bool:
        return phrase not in heads and phrase not in MODIFIER_LEXICON and phrase not in STOP_WORDS and not phrase.isdigit()

    brands = {s for s, n in spans.items() if n >= cfg.min_count and usable(s)}
    brands |= {w for w, hs in first.items() if len(hs) >= cfg.min_brand_types and first_count[w] >= cfg.min_count and usable(w)}
    prefixes = {" ".join(units[:size]) for units in docs for size in range(1, min(cfg.max_brand_units, len(units)) + 1)}
    return frozenset(brands | (KNOWN_BRANDS & prefixes))


def _learn_modifiers(docs: list[list[str]], heads: frozenset[str], brands: frozenset[str], cfg: KGConfig) -> frozenset[str]:
    """Non-lexicon words that sit right before a head in ``min_count`` titles of several heads.

    This picks up compound-noun modifiers ("polo" tshirt, "innerwear" vest) the lexicon lacks,
    while a product-line name ("Texas" jeans) that precedes one head only is left out.
    """
    if not cfg.learn_modifiers:
        return frozenset()
    count: Counter[str] = Counter()
    before: dict[str, set[str]] = defaultdict(set)
    makers: dict[str, set[str]] = defaultdict(set)
    brand_words = {w for b in brands for w in b.split()}
    for units in docs:
        maker = units[0] if units else ""
        units = _strip_prefix(units, brands, cfg.max_brand_units)
        head = _head_of(units, heads)
        if head is None:
            continue
        pos = len(units) - 1 - units[::-1].index(head)
        if pos == 0:
            continue
        prev = units[pos - 1]
        if prev in MODIFIER_LEXICON or prev in brand_words or prev == head or not is_word(prev) or not prev.replace(" ", "").isalpha():
            continue
        count[prev] += 1
        before[prev].add(head)
        makers[prev].add(maker)
    return frozenset(
        w for w, n in count.items() if n >= cfg.min_count and len(before[w]) >= cfg.min_modifier_heads and len(makers[w]) >= cfg.min_modifier_brands
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def mine_concepts(titles: Sequence[str], *, min_count: int = 3, max_modifiers: int = 3, config: KGConfig | None = None) -> ConceptVocabulary:
    """Learn heads, brands and modifiers from ``titles`` and count their concepts.

    Pass either ``config`` or the two keyword shortcuts. Raises :class:`KGError` for no titles
    or when no title names a product type (nothing to build a graph from).
    """
    if config is None:
        config = KGConfig(min_count=min_count, max_modifiers=max_modifiers)
    elif (min_count, max_modifiers) != (3, 3):
        raise KGError("pass either config=KGConfig(...) or min_count/max_modifiers, not both")
    titles = list(titles)
    if not titles:
        raise KGError("cannot mine concepts from an empty catalogue: no titles given")
    docs = [normalise_title(t) for t in titles]
    heads = _learn_heads(docs, config)
    brands = _detect_brands(docs, heads, config)
    learned = _learn_modifiers(docs, heads, brands, config)
    modifiers = frozenset(MODIFIER_LEXICON) | learned

    counts: Counter[str] = Counter()
    shapes: dict[str, tuple[str, tuple[str, ...]]] = {}
    covered = 0
    for units in docs:
        parsed = _parse(units, heads, modifiers, brands, config)
        if parsed is None:
            continue
        covered += 1
        for phrase, mods in _candidates(parsed[0], parsed[1], config.max_modifiers):
            counts[phrase] += 1
            shapes.setdefault(phrase, (parsed[0], mods))
    concepts = {
        phrase: Concept(phrase=phrase, head=shapes[phrase][0], modifiers=shapes[phrase][1], count=n)
        for phrase, n in sorted(counts.items())
        if not shapes[phrase][1] or n >= config.min_count
    }
    if not concepts:
        raise KGError(f"no concept found in {len(titles)} title(s): no title ends in a known or recurring product type")
    return ConceptVocabulary(
        config=config,
        heads=frozenset(c.head for c in concepts.values()),
        brands=brands,
        modifiers=modifiers,
        learned_modifiers=learned,
        concepts=concepts,
        n_titles=len(titles),
        n_titles_with_concept=covered,
    )


def extract_concepts(title: str, vocab: ConceptVocabulary) -> list[str]:
    """The concepts a title contains, most specific first ([] when it names no product type)."""
    parsed = _parse(normalise_title(title), vocab.heads, vocab.modifiers, vocab.brands, vocab.config)
    if parsed is None:
        return []
    return [phrase for phrase, _ in _candidates(parsed[0], parsed[1], vocab.config.max_modifiers) if phrase in vocab.concepts]
