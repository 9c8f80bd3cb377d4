"""The Kaggle styles.csv importer: unquoted commas, NA values, skipped rows, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_image

from lightclip.cli import main
from lightclip.data import _images as images_module
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.data.kaggle import import_kaggle, parse_styles_csv
from lightclip.tracking import PARENT_RUN_ENV

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
    frame, skipped, lines_read, blank_lines = parse_styles_csv(kaggle_dir / "styles.csv")
    assert (lines_read, blank_lines) == (9, 1)  # lines 2-10 after the header; line 10 is blank
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
    assert (report.lines_read, report.blank_lines) == (9, 1)
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
    frame, parse_skipped, lines_read, blank_lines = parse_styles_csv(real_catalogue_dir / "styles.csv")
    assert (lines_read, blank_lines) == (9646, 0)
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


def _kaggle_source(root: Path, rows: list[str], image_ids: list[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "styles.csv").write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    for i in image_ids:
        make_image(root / "images" / f"{i}.jpg", colour=(i * 20 % 256, 40, 40), fmt="JPEG")
    return root


def _row(i: int, title: str) -> str:
    return f"{i},Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,{title}"


@pytest.mark.parametrize(("broken", "field"), [('"', 10), ('"Nike Blue Shoe', 10), ('Nike Blue Shoe,"', 11)])
def test_an_unclosed_quote_costs_its_own_line_only(broken: str, field: int, tmp_path: Path):
    """A quote left open at the end of line 3 once swallowed the 7 lines after it into one title."""
    rows = [_row(1, "Plain Red Tshirt"), _row(2, broken)] + [_row(i, f"Tshirt number {i}") for i in range(3, 10)]
    source = _kaggle_source(tmp_path / "kaggle", rows, list(range(1, 10)))
    catalogue, report = import_kaggle(source, tmp_path / "out", progress=False)

    physical_data_lines = len((source / "styles.csv").read_text().splitlines()) - 1
    assert physical_data_lines == 9
    assert report.items_written + len(report.skipped) + report.blank_lines == physical_data_lines == report.lines_read
    assert catalogue.items["id"].tolist() == ["1", "3", "4", "5", "6", "7", "8", "9"]
    assert catalogue.items.set_index("id").loc["3", "title"] == "Tshirt number 3"  # not glued to line 3
    [bad] = report.skipped
    assert (bad.source, bad.id) == ("styles.csv:3", "2")
    assert bad.reason.startswith(f"bad_row: line 3: field {field} opens a quote that is not closed on this line")
    assert "read 9 rows, wrote 8 items, skipped 1" in report.summary() and "2 (styles.csv:3)" in report.summary()


def test_a_quoted_title_with_commas_on_one_line_is_fine(tmp_path: Path):
    rows = [_row(1, '"Blue, Red and ""Green"" Tshirt"'), _row(2, 'Nike "Air" Shoe')]
    source = _kaggle_source(tmp_path / "kaggle", rows, [1, 2])
    catalogue, report = import_kaggle(source, tmp_path / "out", progress=False)
    assert catalogue.items["title"].tolist() == ['Blue, Red and "Green" Tshirt', 'Nike "Air" Shoe'] and report.skipped == []


def test_a_non_utf8_byte_is_named_by_line_and_column(tmp_path: Path):
    source = _kaggle_source(tmp_path / "kaggle", [_row(1, "Plain Red Tshirt"), _row(2, "Plain Tshirt")], [1, 2])
    styles = source / "styles.csv"
    lines = styles.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"Plain Tshirt", "Café Tshirt".encode("latin-1"))  # line 3: é as the byte 0xe9
    styles.write_bytes(b"".join(lines))
    column = len(_row(2, "Caf")) + 1
    with pytest.raises(CatalogueError, match=rf"styles.csv:3: not UTF-8 text: byte 0xe9 at column {column} "):
        import_kaggle(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_images_outside_the_source_are_refused_unless_allowed(tmp_path: Path):
    source = _kaggle_source(tmp_path / "kaggle", [_row(i, f"Tshirt number {i}") for i in range(1, 5)], [1, 2])
    secret = make_image(tmp_path / "elsewhere" / "secret.png", colour=(1, 2, 3))
    (source / "images" / "3.jpg").symlink_to(secret)  # a link out of the source
    make_image(source / "more" / "4.jpg", colour=(9, 9, 9), fmt="JPEG")
    (source / "images" / "4.jpg").symlink_to(Path("..") / "more" / "4.jpg")  # a link that stays inside: fine
    catalogue, report = import_kaggle(source, tmp_path / "out", progress=False)
    assert catalogue.items["id"].tolist() == ["1", "2", "4"]
    [refused] = report.skipped
    assert (refused.source, refused.id) == ("styles.csv:4", "3")
    assert refused.reason == f"outside_root: images/3.jpg is {secret.resolve()}, outside {source}"
    assert any(n.startswith("outside_root: 1 row(s)") and "--allow-outside-root" in n for n in report.notes)
    assert b"secret" not in b"".join(p.read_bytes() for p in (tmp_path / "out" / "images").iterdir())
    assert (tmp_path / "out" / "images" / "3.jpg").exists() is False

    allowed, report = import_kaggle(source, tmp_path / "allowed", allow_outside_root=True, progress=False)
    assert allowed.items["id"].tolist() == ["1", "2", "3", "4"] and report.skipped == []
    assert (tmp_path / "allowed" / "images" / "3.jpg").read_bytes() == secret.read_bytes()

    # images/ itself a link to elsewhere: every row is outside
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "styles.csv").write_bytes((source / "styles.csv").read_bytes())
    (linked / "images").symlink_to(source / "images")
    _, report = import_kaggle(linked, tmp_path / "out2", progress=False)
    assert report.items_written == 0 and report.skipped_by_reason() == {"outside_root": 4}


def test_cli_import_kaggle_refuses_outside_images_unless_allowed(tmp_path: Path, monkeypatch, capsys):
    source = _kaggle_source(tmp_path / "kaggle", [_row(1, "Plain Red Tshirt"), _row(2, "Linked Tshirt")], [1])
    (source / "images" / "2.jpg").symlink_to(make_image(tmp_path / "elsewhere" / "2.jpg", fmt="JPEG"))
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the importer needs none
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    assert main(["-q", "data", "import-kaggle", "kaggle", "--out", "out"]) == 0
    assert "wrote 1 items, skipped 1" in capsys.readouterr().out
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by MLflow in this process; a new command starts without it
    assert main(["-q", "data", "import-kaggle", "kaggle", "--out", "out2", "--allow-outside-root"]) == 0
    assert "wrote 2 items, skipped 0" in capsys.readouterr().out
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
