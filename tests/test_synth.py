"""The synthetic catalogue: reproducible bytes, Kaggle-like labels, titles that match the drawings."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lightclip.config import SynthConfig, load_params
from lightclip.data.synth import generate as synth_generate
from lightclip.data.catalogue import CATALOGUE_FILE, COLUMNS, Catalogue, CatalogueError
from lightclip.data.synth import SYNTH_VERSION, ItemSpec, generate_catalogue, render_item

REPO_ROOT = Path(__file__).resolve().parents[1]
PATTERN_KEYWORDS = ("Strip", "Check", "Dot", "Floral")


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(catalogue: Catalogue, image: str) -> np.ndarray:
    with Image.open(catalogue.image_path(image)) as im:
        return np.asarray(im, dtype=np.float64)


def high_frequency(a: np.ndarray) -> float:
    """Mean absolute difference between neighbouring grey pixels: stripes, checks and dots raise it."""
    grey = a.mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def foreground(image: Image.Image) -> np.ndarray:
    """Pixels that differ clearly from the (plain) background, taken from the corners."""
    a = np.asarray(image, dtype=np.float64)
    corners = np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]]).mean(axis=0)
    return np.abs(a - corners).sum(axis=2) > 40


def spec(**overrides: object) -> ItemSpec:
    base = ItemSpec(id="t", article="Tshirts", gender="Men", base="Navy Blue", second=None, pattern="solid", sleeve="short",
                    length=None, fit=None, style="round", brand="Brand", season="Summer", usage="Casual", year=2015, seed=7)
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    """One ~200-item catalogue shared by the content checks."""
    return generate_catalogue(tmp_path_factory.mktemp("synth") / "raw", SynthConfig(seed=0, n_items=200, image_size=64), progress=False)


def test_version_is_an_int() -> None:
    assert isinstance(SYNTH_VERSION, int) and SYNTH_VERSION >= 1


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    config = SynthConfig(seed=3, n_items=40, image_size=64)
    first = digests(generate_catalogue(tmp_path / "a", config, progress=False).root)
    second = digests(generate_catalogue(tmp_path / "b", config, progress=False).root)
    assert len(first) == 41 and CATALOGUE_FILE in first
    assert first == second
    other = digests(generate_catalogue(tmp_path / "c", config.model_copy(update={"seed": 4}), progress=False).root)
    assert other[CATALOGUE_FILE] != first[CATALOGUE_FILE]
    assert sum(other[k] != first[k] for k in first) > 30


def test_table_schema_and_labels(catalogue: Catalogue) -> None:
    items = catalogue.items
    allowed = load_params(REPO_ROOT / "params.yaml").validate_.allowed_values
    assert list(items.columns) == list(COLUMNS) and len(items) == 200
    assert items["id"].is_unique and all(re.fullmatch(r"s\d{5}", i) for i in items["id"])
    assert (items["image"] == "images/" + items["id"] + ".png").all()
    assert items["split"].isna().all()
    assert items["articleType"].nunique() >= 15
    assert set(items["masterCategory"]) == {"Apparel", "Footwear", "Accessories"}
    for column in ("gender", "masterCategory", "season", "usage", "baseColour"):
        assert set(items[column]) <= set(allowed[column]), column
    assert items["year"].between(2010, 2020).all()
    assert set(items.loc[items["articleType"].isin(["Dresses", "Skirts", "Heels"]), "gender"]) <= {"Women", "Girls"}
    reloaded = Catalogue.load(catalogue.root)
    pd.testing.assert_frame_equal(reloaded.items, items)


def test_titles_name_the_base_colour_and_vary(catalogue: Catalogue) -> None:
    items = catalogue.items
    assert items["title"].str.len().between(3, 200).all()
    for title, colour in zip(items["title"], items["baseColour"]):
        assert colour.lower() in title.lower(), title
    words = " ".join(items["title"]).split()
    assert {"T-shirt", "Tshirt", "Tee", "T-Shirt"} & set(words) and len({"Checked", "Check", "Checkered"} & set(words)) >= 2
    assert (items.groupby(["articleType", "baseColour"]).size() >= 3).sum() >= 10  # many items share type + colour


def test_images_are_64px_rgb_pngs(catalogue: Catalogue) -> None:
    for path in catalogue.image_paths():
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
            image.load()


def test_base_colour_is_visible(catalogue: Catalogue) -> None:
    items = catalogue.items
    red = np.array([255.0, 0.0, 0.0])

    def mean_rgb(colour: str) -> np.ndarray:
        images = items.loc[items["baseColour"] == colour, "image"]
        assert len(images) >= 5
        return np.mean([pixels(catalogue, p).reshape(-1, 3).mean(axis=0) for p in images], axis=0)

    reds, blues = mean_rgb("Red"), mean_rgb("Blue")
    assert np.linalg.norm(reds - red) + 30 < np.linalg.norm(blues - red)
    assert reds[0] - reds[2] > 15 and blues[2] - blues[0] > 15


def test_patterns_named_in_titles_are_visible(catalogue: Catalogue) -> None:
    items = catalogue.items
    apparel = items[items["masterCategory"] == "Apparel"]
    patterned = apparel[apparel["title"].str.contains("|".join(PATTERN_KEYWORDS))]
    plain = apparel[~apparel["title"].str.contains("|".join(PATTERN_KEYWORDS))]
    assert len(patterned) >= 10 and len(plain) >= 10
    hf_patterned = np.median([high_frequency(pixels(catalogue, p)) for p in patterned["image"]])
    hf_plain = np.median([high_frequency(pixels(catalogue, p)) for p in plain["image"]])
    assert hf_patterned > 1.3 * hf_plain


@pytest.mark.parametrize("pattern", ["striped", "checked", "dotted", "floral"])
def test_pattern_adds_high_frequency_energy(pattern: str) -> None:
    for seed in range(3):
        solid = high_frequency(np.asarray(render_item(spec(seed=seed), 64), dtype=np.float64))
        patterned = high_frequency(np.asarray(render_item(spec(seed=seed, pattern=pattern, second="White"), 64), dtype=np.float64))
        assert patterned > 1.5 * solid, (pattern, seed, patterned, solid)


def test_lengths_sleeves_and_heels_are_visible() -> None:
    def height(item: ItemSpec) -> int:
        rows = np.flatnonzero(foreground(render_item(item, 64)).any(axis=1))
        return int(rows[-1] - rows[0])

    def area(item: ItemSpec) -> int:
        return int(foreground(render_item(item, 64)).sum())

    dress = spec(article="Dresses", gender="Women", style="", sleeve="sleeveless")
    mini, midi, maxi = (height(replace(dress, length=length)) for length in ("mini", "midi", "maxi"))
    assert mini + 5 < midi and midi + 5 < maxi
    assert area(spec(sleeve="sleeveless")) + 80 < area(spec(sleeve="short")) < area(spec(sleeve="long"))
    shorts, jeans = spec(article="Shorts", pattern="solid"), spec(article="Jeans")
    assert height(shorts) + 15 < height(jeans)
    heels, flats = spec(article="Heels", gender="Women", style="block"), spec(article="Flats", gender="Women", style="flat")
    assert height(flats) + 8 < height(heels)


def test_image_size_and_ids_follow_config(tmp_path: Path) -> None:
    cat = generate_catalogue(tmp_path / "small", SynthConfig(seed=1, n_items=10, image_size=40), progress=False)
    assert list(cat.items["id"]) == [f"s{i:05d}" for i in range(1, 11)]
    assert cat.root == tmp_path / "small"
    with Image.open(cat.image_paths()[0]) as image:
        assert image.size == (40, 40)


def test_refuses_a_directory_with_foreign_files(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CatalogueError, match="notes.txt"):
        generate_catalogue(out, SynthConfig(n_items=10), progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_refuses_to_replace_a_plain_file(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.write_text("not a catalogue")
    with pytest.raises(CatalogueError, match="not a directory"):
        generate_catalogue(out, SynthConfig(n_items=10), progress=False)
    assert out.read_text() == "not a catalogue"


def test_refuses_a_foreign_file_among_the_images(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    generate_catalogue(out, SynthConfig(n_items=10), progress=False)
    (out / "images" / "readme.md").write_text("mine")
    with pytest.raises(CatalogueError, match="images/readme.md"):
        generate_catalogue(out, SynthConfig(n_items=10), progress=False)
    assert (out / "images" / "readme.md").read_text() == "mine"


def test_replaces_a_previous_catalogue(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    generate_catalogue(out, SynthConfig(seed=1, n_items=12), progress=False)
    (out / "import_report.json").write_text("{}")
    generate_catalogue(out, SynthConfig(seed=2, n_items=10), progress=False)
    fresh = generate_catalogue(tmp_path / "fresh", SynthConfig(seed=2, n_items=10), progress=False)
    assert digests(out) == digests(fresh.root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "raw"]


def test_a_crash_leaves_the_previous_catalogue_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "raw"
    generate_catalogue(out, SynthConfig(seed=1, n_items=10), progress=False)
    before = digests(out)
    calls = {"n": 0}
    real = synth_generate.render_item  # looked up where the writer calls it

    def flaky(item: ItemSpec, size: int) -> Image.Image:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(item, size)

    monkeypatch.setattr(synth_generate, "render_item", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_catalogue(out, SynthConfig(seed=2, n_items=10), progress=False)
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
