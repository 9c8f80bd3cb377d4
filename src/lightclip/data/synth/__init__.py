"""The embedded synthetic fashion catalogue: drawn products with titles that describe them.

The project must train, evaluate and demo without downloading anything, so it ships a small
deterministic "shop" instead of a data set. Every product is drawn with PIL (no fonts, no
noise) and every fine attribute its title names (second colour, pattern, sleeve, length, heel,
lens shape, ...) is visible in its image, so retrieval has to look past type and colour.

Same seed and config give byte-identical files; bump :data:`SYNTH_VERSION` whenever the
rendering or sampling changes so that cached catalogues are known to be stale.

One module per part: ``vocabulary``, ``drawing``, ``articles`` (rendering), ``titles`` and
``generate`` (writing the catalogue); every public name is re-exported here.
"""

from __future__ import annotations

from lightclip.data.synth.vocabulary import (  # noqa: F401 (re-exported)
    APPAREL_BRANDS,
    ARTICLES,
    ARTICLE_BY_NAME,
    ArticleType,
    BACKGROUNDS,
    BRANDS,
    COLD,
    COLOURS,
    COLOUR_WEIGHTS,
    FOOTWEAR_BRANDS,
    ItemSpec,
    LENS_TINTS,
    METALS,
    Point,
    RGB,
    SEASONS,
    SYNTH_VERSION,
    WARM,
)
from lightclip.data.synth.drawing import (  # noqa: F401 (re-exported)
    Op,
    Pen,
    Sketch,
    along,
    arc,
    bezier,
    colour_distance,
    contrast_ink,
    edge_colour,
    luminance,
    mirror_x,
    mix,
    pattern_fill,
    rounded_rect,
    shade,
)
from lightclip.data.synth.articles import (  # noqa: F401 (re-exported)
    DRAWERS,
    DRESS_HEM,
    SKIRT_HEM,
    draw_bag,
    draw_belt,
    draw_bottoms,
    draw_cap,
    draw_dress,
    draw_flipflop,
    draw_heel,
    draw_sandal,
    draw_scarf,
    draw_shoe,
    draw_skirt,
    draw_sunglasses,
    draw_top,
    draw_watch,
    render_item,
    render_scale,
)
from lightclip.data.synth.titles import (  # noqa: F401 (re-exported)
    FABRIC_FAMILIES,
    GENDER_WORDS,
    LENGTH_WORDS,
    PATTERN_SUFFIX,
    PATTERN_WORDS,
    SLEEVE_WORDS,
    compose_title,
    pick_second,
    sample_spec,
)
from lightclip.data.synth.generate import (  # noqa: F401 (re-exported)
    IMAGE_SUFFIXES,
    REPLACEABLE,
    generate_catalogue,
    save_png,
    unexpected_entries,
)
