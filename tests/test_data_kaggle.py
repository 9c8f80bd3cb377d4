"""The Kaggle styles.csv importer: unquoted commas, NA values, skipped rows, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_image

from lightclip.data import _images as images_module
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.data.kaggle import import_kaggle, parse_styles_csv

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
STYLES = "\n".join(
    [
        HEADER,
        "1,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Plain Red Tshirt",  # line 2
        "2,Unisex,Footwear,Shoes,Casual Shoes,White,Winter,2012,Casual,Newfeel Unisex White, Blue and Orange Shoes",  # 3
        '3,Women,Apparel,Topwear,Tops,Blue,Fall,2013,Casual,"Quoted, Blue Top"',  # 4
        "4,Women,Apparel,Topwear,Tops,Green,Fall,2013,Casual,Top Without Image",  # 5
        "5,Women,Apparel,Topwear,Tops",  # 6: short row
        "6,Men,Apparel,Bottomwear,Jeans,NA,Summer,2011,NA,Jeans With NA Usage",  # 7
        "7,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2011,Casual,   ",  # 8: empty title
        "8,Men,Apparel,Bottomwear,Jeans,Blue,Summer,twenty,Casual,Jeans With Bad Year",  # 9
        "",
    ]
)


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    source = tmp_path / "kaggle"
    source.mkdir()
    (source / "styles.csv").write_text(STYLES + "\n", encoding="utf-8")
    for i in (1, 2, 3, 5, 6, 7, 8):  # no image for 4
        make_image(source / "images" / f"{i}.jpg", colour=(i * 30, 10, 10), fmt="JPEG")
    return source


def test_parse_styles_csv_repairs_commas_and_nulls(kaggle_dir: Path):
    frame, skipped = parse_styles_csv(kaggle_dir / "styles.csv")
    assert frame["id"].tolist() == ["1", "2", "3", "4", "6", "8"]
    titles = dict(zip(frame["id"], frame["title"]))
    assert titles["2"] == "Newfeel Unisex White, Blue and Orange Shoes"
    assert titles["3"] == "Quoted, Blue Top"
    assert frame.loc[frame["id"] == "2", "unquoted_commas"].item()
    assert not frame.loc[frame["id"] == "3", "unquoted_commas"].item()
    row6 = frame[frame["id"] == "6"].iloc[0]
    assert row6["usage"] is None and row6["baseColour"] is None and row6["year"] == 2011
    row8 = frame[frame["id"] == "8"].iloc[0]
    assert pd.isna(row8["year"]) and row8["invalid_year"] == "twenty"
    assert [(s.source, s.id, s.reason.split(":")[0]) for s in skipped] == [
        ("styles.csv:6", "5", "bad_row"),
        ("styles.csv:8", "7", "empty_title"),
    ]
    assert "line 6 has 5 fields, expected 10" in skipped[0].reason


def test_import_kaggle_counts_reasons_and_report(kaggle_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    catalogue, report = import_kaggle(kaggle_dir, out, progress=False)
    assert catalogue.root == out
    assert catalogue.items["id"].tolist() == ["1", "2", "3", "6", "8"]
    assert report.rows_read == 8 and report.items_written == 5
    assert report.skipped_by_reason() == {"bad_row": 1, "empty_title": 1, "missing_image": 1}
    missing = [s for s in report.skipped if s.reason.startswith("missing_image")]
    assert missing[0].id == "4" and missing[0].source == "styles.csv:5"
    notes = "\n".join(report.notes)
    assert "rows_with_unquoted_commas: 1 (ids 2)" in notes
    assert "year_not_integer: 1" in notes and "8='twenty'" in notes
    summary = report.summary()
    assert "skipped 1 x missing_image: 4" in summary and "rows_with_unquoted_commas" in summary

    # the written catalogue: reloadable, images copied byte for byte, report beside it
    loaded = Catalogue.load(out)
    assert loaded.items.equals(catalogue.items)
    assert loaded.items["image"].tolist() == [f"images/{i}.jpg" for i in ("1", "2", "3", "6", "8")]
    for image in loaded.items["image"]:
        assert (out / image).read_bytes() == (kaggle_dir / image).read_bytes()
    row = loaded.items.set_index("id").loc["6"]
    assert pd.isna(row["usage"]) and row["year"] == 2011 and row["title"] == "Jeans With NA Usage"
    payload = json.loads((out / "import_report.json").read_text())
    assert payload["skipped_by_reason"]["missing_image"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_bad_header_and_missing_layout_are_clear_errors(tmp_path: Path):
    with pytest.raises(CatalogueError, match="no styles.csv"):
        import_kaggle(tmp_path, tmp_path / "out", progress=False)
    bad = tmp_path / "styles.csv"
    bad.write_text("id,gender,title\n1,Men,x\n")
    with pytest.raises(CatalogueError, match=r"styles.csv:1: unexpected header: missing \['masterCategory'"):
        parse_styles_csv(bad)


def test_output_dir_rules_and_atomic_failure(kaggle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CatalogueError, match="not empty; pass overwrite=True"):
        import_kaggle(kaggle_dir, out, progress=False)
    with pytest.raises(CatalogueError, match="holds no catalogue"):
        import_kaggle(kaggle_dir, out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"

    out2 = tmp_path / "out2"
    import_kaggle(kaggle_dir, out2, progress=False)
    (out2 / "stale.txt").write_text("old")
    import_kaggle(kaggle_dir, out2, overwrite=True, progress=False)  # a catalogue: replaced whole
    assert not (out2 / "stale.txt").exists() and (out2 / "catalogue.parquet").is_file()

    def broken_copy(jobs, **kwargs):
        raise CatalogueError("disk full")

    monkeypatch.setattr(images_module, "copy_images", broken_copy)  # used by finish_import
    with pytest.raises(CatalogueError, match="disk full"):
        import_kaggle(kaggle_dir, tmp_path / "out3", progress=False)
    with pytest.raises(CatalogueError, match="disk full"):
        import_kaggle(kaggle_dir, out2, overwrite=True, progress=False)
    assert not (tmp_path / "out3").exists()
    assert Catalogue.load(out2).items["id"].tolist() == ["1", "2", "3", "6", "8"]  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle", "out", "out2"]


@pytest.mark.real_catalogue
def test_real_catalogue(real_catalogue_dir: Path, tmp_path: Path):
    frame, parse_skipped = parse_styles_csv(real_catalogue_dir / "styles.csv")
    assert parse_skipped == []
    titles = dict(zip(frame["id"], frame["title"]))
    assert titles["4854"] == "Newfeel Unisex White, Blue and Orange Casual Shoes"
    comma_ids = sorted(frame.loc[frame["unquoted_commas"], "id"])
    assert len(comma_ids) == 3 and "4854" in comma_ids

    catalogue, report = import_kaggle(real_catalogue_dir, tmp_path / "real", progress=False)
    assert len(catalogue) == 9583 and report.items_written == 9583
    assert report.rows_read == 9646
    # Every row without an image is listed by id. 63 rows have no image file: 60 plain ones
    # plus the 3 rows with unquoted commas in the title, whose images are absent too.
    missing = {s.id for s in report.skipped if s.reason.startswith("missing_image")}
    assert report.skipped_by_reason() == {"missing_image": 63}
    assert set(comma_ids) <= missing and len(missing - set(comma_ids)) == 60
    images = {p.name for p in (real_catalogue_dir / "images").iterdir()}
    assert missing == {i for i in frame["id"] if f"{i}.jpg" not in images}
    note = next(n for n in report.notes if n.startswith("rows_with_unquoted_commas"))
    assert note.startswith("rows_with_unquoted_commas: 3") and all(i in note for i in comma_ids)
    assert "rows_with_unquoted_commas: 3" in report.summary()
