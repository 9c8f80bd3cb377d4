"""The data stages' sections: the default catalogue, validation, the split and the concept graph."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from lightclip.config.base import ATTRIBUTE_COLUMNS, StrictModel


class SynthConfig(StrictModel):
    """The embedded synthetic catalogue (``lightclip data synth``)."""

    seed: int = 0
    n_items: int = Field(3000, ge=10, le=1_000_000)
    image_size: int = Field(64, ge=32, le=512)


#: The attribute values of the Kaggle fashion catalogue (and of the synthetic default).
_KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "gender": ("Men", "Women", "Boys", "Girls", "Unisex"),
    "masterCategory": ("Apparel", "Accessories", "Footwear", "Personal Care", "Free Items", "Sporting Goods", "Home"),
    "season": ("Summer", "Winter", "Fall", "Spring"),
    "usage": ("Casual", "Ethnic", "Formal", "Sports", "Smart Casual", "Travel", "Party", "Home"),
    "baseColour": (
        "Beige", "Black", "Blue", "Bronze", "Brown", "Burgundy", "Charcoal", "Coffee Brown", "Copper", "Cream",
        "Fluorescent Green", "Gold", "Green", "Grey", "Grey Melange", "Khaki", "Lavender", "Magenta", "Maroon",
        "Mauve", "Metallic", "Multi", "Mustard", "Navy Blue", "Nude", "Off White", "Olive", "Orange", "Peach",
        "Pink", "Purple", "Red", "Rust", "Sea Green", "Silver", "Skin", "Steel", "Tan", "Taupe", "Teal",
        "Turquoise Blue", "White", "Yellow",
    ),
}


#: The most pixels (width x height) an image may have; larger files are refused before decoding.
MAX_IMAGE_PIXELS: int = 50_000_000
#: Pillow refuses anything above twice its ``Image.MAX_IMAGE_PIXELS`` as a decompression bomb.
PIL_PIXEL_LIMIT: int = 2 * 89_478_485


class ValidateConfig(StrictModel):
    """The Great Expectations suite run by the ``validate`` stage."""

    #: ``quarantine``: rows failing an error-level check go to ``quarantine.csv`` with their reason
    #: and the rest is the catalogue (a real export with two "NA" titles passes); ``fail``: any one fails the stage.
    on_error: Literal["fail", "quarantine"] = "quarantine"
    #: Above this fraction of quarantined rows the stage fails even in quarantine mode: a broken
    #: export (a lost image folder) must not pass as a small catalogue.
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    #: Attribute values outside ``allowed_values`` (a growing taxonomy): ``warn`` keeps and counts
    #: them per column, ``quarantine`` makes them an error-level row check, ``fail`` fails the stage naming the values.
    unseen_values: Literal["warn", "quarantine", "fail"] = "warn"
    title_min_chars: int = Field(3, ge=1)
    title_max_chars: int = Field(200, ge=1)
    placeholder_titles: list[str] = Field(
        default_factory=lambda: ["n/a", "na", "none", "null", "nan", "title", "untitled", "tbd", "todo", "test", "xxx", "-", "?"]
    )
    min_image_side: int = Field(32, ge=1)
    #: Larger images are quarantined as ``image_too_large``; the image cache, serving and search use the default.
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, le=PIL_PIXEL_LIMIT)
    year_min: int = 2000
    year_max: int = 2030
    #: Known values per attribute column; a column not listed is not checked.
    allowed_values: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in _KNOWN_VALUES.items()})

    @field_validator("allowed_values")
    @classmethod
    def _known_columns(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(value) - set(ATTRIBUTE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown attribute column(s) {unknown}; allowed: {list(ATTRIBUTE_COLUMNS)}")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> "ValidateConfig":
        if self.title_min_chars > self.title_max_chars:
            raise ValueError("title_min_chars must not exceed title_max_chars")
        if self.year_min > self.year_max:
            raise ValueError("year_min must not exceed year_max")
        return self


SplitSize = Union[int, float]


#: ``split.by`` values besides an attribute column.
SPLIT_ORDERS: tuple[str, ...] = ("random", "id_order")


class SplitConfig(StrictModel):
    """Deterministic train/val/test split; sizes are fractions (0-1) or item counts (>= 1).

    ``by``: ``random`` (seeded), ``id_order`` (the largest ids are the test set, the next ones
    val: new products) or an attribute column such as ``year`` (its latest values are the test set).
    """

    seed: int = 0
    val: SplitSize = 0.1
    test: SplitSize = 0.2
    by: str = "random"

    @field_validator("by")
    @classmethod
    def _known_order(cls, value: str) -> str:
        if value not in SPLIT_ORDERS and value not in ATTRIBUTE_COLUMNS:
            raise ValueError(f"unknown split order {value!r}; allowed: {list(SPLIT_ORDERS)} or a column of {list(ATTRIBUTE_COLUMNS)}")
        return value

    @field_validator("val", "test")
    @classmethod
    def _positive(cls, value: SplitSize) -> SplitSize:
        if isinstance(value, bool) or value < 0 or (isinstance(value, float) and value >= 1.0):
            raise ValueError("must be a fraction in [0, 1) or a non-negative item count")
        return value


class KGConfig(StrictModel):
    """The ``build_kg`` stage: concept mining and each concept's prototype images.

    Mining (``lightclip.kg.concepts``): ``min_count`` titles a phrase or a learned head must occur
    in; ``max_modifiers`` modifiers at most in a concept (the deepest level below a product type);
    ``max_run`` modifiers read before the head; ``min_brand_types`` distinct heads a bare first word
    must start titles of to be a brand; ``max_brand_units`` the longest brand span before a gender
    word; ``min_modifier_heads`` / ``min_modifier_brands`` distinct heads / brands a non-lexicon
    word must precede to be a modifier (a word of one brand only is a product-line name);
    ``learn_modifiers`` learn modifiers from the data at all (else the lexicon only).

    Prototypes: ``prototypes_per_concept`` images per concept chosen by FAISS top
    ``prototype_pool`` then maximal marginal relevance (``mmr_lambda``). The knowledge graph
    records this rule beside its prototypes, and pre-training re-picks prototypes with it.
    """

    min_count: int = Field(3, ge=1)
    max_modifiers: int = Field(3, ge=0, le=6)
    max_run: int = Field(6, ge=1, le=10)
    min_brand_types: int = Field(2, ge=1)
    max_brand_units: int = Field(4, ge=1, le=8)
    min_modifier_heads: int = Field(2, ge=1)
    min_modifier_brands: int = Field(2, ge=1)
    learn_modifiers: bool = True
    prototypes_per_concept: int = Field(10, ge=1, le=32, description="prototype images per concept (the reference: 10)")
    #: MMR trade-off: 1 = pure relevance, 0 = pure diversity.
    mmr_lambda: float = Field(0.7, ge=0.0, le=1.0)
    #: Candidates retrieved per concept before MMR re-ranking.
    prototype_pool: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _run_holds_modifiers(self) -> "KGConfig":
        if self.max_run < self.max_modifiers:
            raise ValueError(f"max_run ({self.max_run}) must be >= max_modifiers ({self.max_modifiers})")
        return self

    def prototype_selection(self) -> dict[str, Any]:
        """How prototypes are chosen; saved beside them so pre-training re-picks them the same way."""
        return self.model_dump(include={"prototypes_per_concept", "mmr_lambda", "prototype_pool"})
