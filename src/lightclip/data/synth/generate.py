"""Writing the catalogue: images and table, byte-identical for one seed and config."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lightclip.config import SynthConfig
from lightclip.data.catalogue import CATALOGUE_FILE, Catalogue, CatalogueError, new_catalogue
from lightclip.data.synth.articles import render_item
from lightclip.data.synth.titles import compose_title, sample_spec
from lightclip.data.synth.vocabulary import ARTICLE_BY_NAME
from lightclip.io import staged_dir

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
