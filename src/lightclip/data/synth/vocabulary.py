"""What the synthetic shop sells: colours, brands, article types and the spec of one product."""

from __future__ import annotations

from dataclasses import dataclass

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
