"""The validate stage: one GX suite, a clear message per failure, fail and quarantine modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from conftest import make_image
from PIL import Image, ImageFile
from test_imagecache import bomb_png

from lightclip.config import ValidateConfig
from lightclip.data.catalogue import CATALOGUE_FILE, Catalogue, file_sha256, new_catalogue
from lightclip.stage import StageContext
from lightclip.validation import (
    ValidateInputs,
    ValidateOutputs,
    QUARANTINE_FILE,
    ValidationFailed,
    inspect_images,
    run_validation,
    validate_catalogue,
)

COLOURS = ["Red", "Blue", "Green", "Black", "White", "Yellow", "Pink", "Grey"]


def config(**overrides) -> ValidateConfig:
    """The older tests' explicit settings: fail mode, unseen values are row errors, no quarantine cap."""
    base = dict(
        on_error="fail",
        unseen_values="quarantine",
        max_quarantine_fraction=1.0,
        title_min_chars=3,
        title_max_chars=200,
        min_image_side=32,
        year_min=2000,
        year_max=2030,
        allowed_values={"gender": ["Men", "Women", "Unisex"], "baseColour": COLOURS, "season": ["Summer", "Winter"]},
    )
    return ValidateConfig(**(base | overrides))


def run(cat: Catalogue, tmp_path: Path, **overrides):
    out = tmp_path / "validated"
    outputs = ValidateOutputs(catalogue=out, report=tmp_path / "report.md", metrics=tmp_path / "metrics.json")
    return run_validation(config(**overrides), ValidateInputs(catalogue=cat.root), outputs, StageContext(project_dir=tmp_path, progress=False))


def edit(cat: Catalogue, change: Callable[[pd.DataFrame], None]) -> Catalogue:
    items = cat.items.copy()
    change(items)
    return cat.with_items(items).save()


def set_value(row: int, column: str, value) -> Callable[[pd.DataFrame], None]:
    def change(items: pd.DataFrame) -> None:
        items.loc[row, column] = value

    return change


def test_valid_catalogue_passes_and_writes_everything(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(12)
    summary = run(cat, tmp_path)
    assert summary.passed and summary.checks_failed == [] and summary.warnings == []
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (12, 12, 0)
    out = Catalogue.load(tmp_path / "validated")
    assert out.items["id"].tolist() == cat.items["id"].tolist()
    assert all(p.is_file() for p in out.image_paths())  # rebased onto the original images
    assert (tmp_path / "validated" / QUARANTINE_FILE).read_text().startswith("id,image,title,")
    assert len(pd.read_csv(tmp_path / "validated" / QUARANTINE_FILE)) == 0
    report = (tmp_path / "report.md").read_text()
    assert "PASSED" in report and "| image_exists |" in report and "FAIL" not in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows_in"] == metrics["rows_out"] == 12
    assert metrics["rows_quarantined"] == metrics["checks_failed"] == metrics["warnings"] == 0
    assert metrics["unexpected"]["id_unique"] == 0 and "attribute_in_set:gender" in metrics["unexpected"]


def test_inspect_images_reports_size_and_hash(tiny_catalogue):
    cat = tiny_catalogue(3)
    (cat.root / "images" / "1.png").unlink()
    (cat.root / "images" / "2.png").write_bytes(b"not an image")
    info = inspect_images(cat, progress=False)
    assert info["image_exists"].tolist() == [True, False, True]
    assert info["image_decodes"].tolist() == [True, None, False]
    assert (info.loc[0, "image_width"], info.loc[0, "image_min_side"]) == (48, 48)
    assert info.loc[0, "image_sha256"] == file_sha256(cat.root / "images" / "0.png")
    assert info.loc[1, "image_sha256"] is None and pd.isna(info.loc[2, "image_min_side"])


def _missing_image(cat):
    (cat.root / "images" / "3.png").unlink()
    return cat


def _garbage_image(cat):
    (cat.root / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return cat


def _small_image(cat):
    make_image(cat.root / "images" / "3.png", size=16)
    return cat


def _id_in_two_splits(cat):
    def change(items):
        items["split"] = "train"
        items.loc[5, "id"] = "1002"
        items.loc[5, "split"] = "test"

    return edit(cat, change)


def _image_in_train_and_test(cat):
    shutil.copyfile(cat.root / "images" / "0.png", cat.root / "images" / "5.png")

    def change(items):
        items["split"] = "train"
        items.loc[5, "split"] = "test"

    return edit(cat, change)


FAILURES = {
    # case: (break the catalogue, {check: ids it must name}; no other error-level check may fail)
    "missing_image": (_missing_image, {"image_exists": ["1003"]}),
    "empty_title": (lambda cat: edit(cat, set_value(3, "title", "   ")), {"title_not_empty": ["1003"]}),
    "placeholder_title": (lambda cat: edit(cat, set_value(3, "title", " N/A ")), {"title_not_placeholder": ["1003"]}),
    "long_title": (lambda cat: edit(cat, set_value(3, "title", "x" * 201)), {"title_length": ["1003"]}),
    "short_title": (lambda cat: edit(cat, set_value(3, "title", "ab")), {"title_length": ["1003"]}),
    "duplicate_id": (lambda cat: edit(cat, set_value(4, "id", "1001")), {"id_unique": ["1001", "1001"]}),
    "undecodable_image": (_garbage_image, {"image_decodes": ["1003"]}),
    "small_image": (_small_image, {"image_min_size": ["1003"]}),
    "unknown_attribute": (lambda cat: edit(cat, set_value(3, "gender", "Martian")), {"attribute_in_set:gender": ["1003"]}),
    "year_out_of_range": (lambda cat: edit(cat, set_value(3, "year", 1980)), {"year_in_range": ["1003"]}),
    "bad_split": (lambda cat: edit(cat, set_value(3, "split", "training")), {"split_value": ["1003"]}),
    "id_in_two_splits": (_id_in_two_splits, {"cross_split_id": ["1002", "1002"], "id_unique": ["1002", "1002"]}),
    "image_in_train_and_test": (_image_in_train_and_test, {"cross_split_image": ["1000", "1005"]}),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_failure_names_check_count_and_ids(case, tiny_catalogue, tmp_path):
    breaker, expected = FAILURES[case]
    cat = breaker(tiny_catalogue(8))
    with pytest.raises(ValidationFailed) as err:
        run(cat, tmp_path)
    message = str(err.value)
    assert message.startswith(f"validation failed: {len(expected)} check(s)")
    result = err.value.result
    assert sorted(c.name for c in result.failed) == sorted(expected)
    for check, ids in expected.items():
        found = result.check(check)
        assert found.example_ids == ids and found.unexpected_count == len(ids)
        assert f"  {check} ({found.expectation}): {len(ids)} row(s), e.g. ids {ids!r}" in message
    # one clear reason per broken row: e.g. a missing image is not also "undecodable"/"too small"
    if case == "missing_image":
        assert result.reasons[3] == ["image_exists"]
    if case == "image_in_train_and_test":
        assert result.check("image_duplicate").success  # across splits it is an error, not a warning
    # fail mode: report and metrics written, no catalogue
    assert not (tmp_path / "validated" / CATALOGUE_FILE).exists()
    report = (tmp_path / "report.md").read_text()
    assert "FAILED" in report and all(f"| {check} |" in report for check in expected)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["checks_failed"] == len(expected) and metrics["rows_out"] == 0
    assert all(metrics["unexpected"][check] == len(ids) for check, ids in expected.items())


def test_quarantine_keeps_exactly_the_clean_rows(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(12)
    (cat.root / "images" / "3.png").unlink()
    shutil.copyfile(cat.root / "images" / "0.png", cat.root / "images" / "9.png")  # same split: warning only

    def change(items):
        items.loc[5, "title"] = "n/a"
        items.loc[7, "year"] = 1850
        items.loc[8, "baseColour"] = "Ultraviolet"
        items.loc[8, "season"] = None  # null attributes are not checked

    cat = edit(cat, change)
    summary = run(cat, tmp_path, on_error="quarantine")
    assert not summary.passed
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (12, 8, 4)
    assert summary.rows_in == summary.rows_out + summary.rows_quarantined
    assert sorted(summary.checks_failed) == sorted(["image_exists", "title_not_placeholder", "year_in_range", "attribute_in_set:baseColour"])
    assert summary.warnings == ["image_duplicate"]
    bad = {"1003", "1005", "1007", "1008"}
    out = Catalogue.load(tmp_path / "validated")
    assert set(out.items["id"]) == {str(1000 + i) for i in range(12)} - bad
    assert {"1000", "1009"} <= set(out.items["id"])  # duplicate images are kept
    assert all(p.is_file() for p in out.image_paths())
    quarantine = pd.read_csv(tmp_path / "validated" / QUARANTINE_FILE, dtype=str)
    assert dict(zip(quarantine["id"], quarantine["reasons"])) == {
        "1003": "image_exists",
        "1005": "title_not_placeholder: 'n/a'",
        "1007": "year_in_range",
        "1008": "attribute_in_set:baseColour: 'Ultraviolet'",
    }
    assert {"title", "image", "split", "reasons"} <= set(quarantine.columns)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["rows_in"], metrics["rows_out"], metrics["rows_quarantined"]) == (12, 8, 4)
    assert metrics["warnings"] == 1 and metrics["unexpected"]["image_duplicate"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "rows quarantined: 4" in report and "image_duplicate" in report.split("## Warnings")[1]


def test_duplicate_images_in_one_split_are_a_warning_only(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(6)
    shutil.copyfile(cat.root / "images" / "1.png", cat.root / "images" / "4.png")
    summary = run(cat, tmp_path)  # fail mode, all splits null: must still pass
    assert summary.passed and summary.rows_out == 6
    assert summary.warnings == ["image_duplicate"]
    check = summary.result.check("image_duplicate")
    assert check.severity == "warning" and not check.success and check.example_ids == ["1001", "1004"]
    assert "image_duplicate (expect_column_values_to_be_unique): 2 row(s)" in (tmp_path / "report.md").read_text()


def test_fail_mode_removes_a_stale_catalogue_of_ours_only(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(6)
    run(cat, tmp_path)
    out = tmp_path / "validated"
    assert (out / CATALOGUE_FILE).exists()
    _missing_image(cat)
    with pytest.raises(ValidationFailed):
        run(cat, tmp_path)
    assert not (out / CATALOGUE_FILE).exists() and not (out / QUARANTINE_FILE).exists()

    # a folder with someone else's files in it is not cleaned; the message says so
    make_image(cat.root / "images" / "3.png")
    run(cat, tmp_path)
    (out / "notes.txt").write_text("mine")
    _missing_image(cat)
    with pytest.raises(ValidationFailed, match="stale .* left in place"):
        run(cat, tmp_path)
    assert (out / "notes.txt").exists()


def test_null_id_is_named_by_row(tiny_catalogue):
    cat = tiny_catalogue(4)
    items = cat.items.copy()
    items.loc[1, "id"] = None
    result = validate_catalogue(Catalogue(root=cat.root, items=items), config(), progress=False)
    check = result.check("id_not_null")
    assert not check.success and check.rows == [1] and check.example_ids == ["<row 1>"]
    assert result.reasons[1] == ["id_not_null"] and result.bad_rows == [1]


@pytest.mark.parametrize("mode", ["fail", "quarantine"])
def test_an_empty_catalogue_fails(mode, tmp_path):
    """Nothing to validate is an error: an import that skipped every row must not look like a pass."""
    cat = new_catalogue(tmp_path / "empty", [])
    with pytest.raises(ValidationFailed) as err:
        run(cat, tmp_path, on_error=mode)
    message = str(err.value)
    assert message.startswith("validation failed: 1 check(s)\n  catalogue_not_empty: ")
    assert f"{cat.table_path} has no rows: nothing to validate" in message and "quarantine impossible" not in message
    assert not (tmp_path / "validated" / CATALOGUE_FILE).exists()
    assert "FAILED" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["checks_failed"] == 1


def test_a_quarantine_of_every_row_fails(tiny_catalogue, tmp_path):
    cat = edit(tiny_catalogue(3), lambda items: items.__setitem__("title", "n/a"))
    with pytest.raises(ValidationFailed, match=r"every one of the 3 rows failed a check: no catalogue written; reasons in .*quarantine.csv"):
        run(cat, tmp_path, on_error="quarantine")
    assert not (tmp_path / "validated" / CATALOGUE_FILE).exists()
    assert pd.read_csv(tmp_path / "validated" / QUARANTINE_FILE)["reasons"].tolist() == ["title_not_placeholder: 'n/a'"] * 3


def test_an_image_too_large_is_quarantined_with_its_size_undecoded(tiny_catalogue, tmp_path, monkeypatch):
    cat = tiny_catalogue(6)
    (cat.root / "images" / "2.png").write_bytes(bomb_png())  # 48 KB on disk, 400 megapixels
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)  # records, still decodes
    info = inspect_images(cat, progress=False)
    assert decoded == [(48, 48)] * 5  # the large one was judged from its header
    assert info.loc[2, ["image_exists", "image_too_large", "image_width", "image_height"]].tolist() == [True, True, 20000, 20000]
    assert info.loc[2, "image_decodes"] is None and info.loc[0, "image_too_large"] is False

    with pytest.raises(ValidationFailed) as err:
        run(cat, tmp_path)
    assert [c.name for c in err.value.result.failed] == ["image_too_large"]
    assert "image_too_large (expect_column_values_to_be_in_set): 1 row(s), e.g. ids ['1002'] (1002: 20000x20000 > 50000000 pixels" in str(err.value)

    summary = run(cat, tmp_path, on_error="quarantine")
    assert (summary.rows_out, summary.rows_quarantined) == (5, 1)
    quarantine = pd.read_csv(tmp_path / "validated" / QUARANTINE_FILE, dtype=str)
    assert dict(zip(quarantine["id"], quarantine["reasons"])) == {"1002": "image_too_large: 20000x20000 > 50000000 pixels"}


def test_the_pixel_limit_is_a_param(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(3)  # 48 x 48 = 2304 pixels each
    assert run(cat, tmp_path, max_image_pixels=2304).passed
    with pytest.raises(ValidationFailed) as err:
        run(cat, tmp_path, max_image_pixels=2303)
    assert err.value.result.check("image_too_large").example_ids == ["1000", "1001", "1002"]
    assert err.value.result.check("image_decodes").success  # not also reported as undecodable


# -- a growing taxonomy: unseen values warn, placeholder titles are quarantined ------------------


def _real_export_like(cat: Catalogue) -> Catalogue:
    """A new colour on one row, a second unseen colour on two, and two "NA" titles (issue 19)."""

    def change(items):
        items.loc[2, "baseColour"] = "Lime Green"
        items.loc[4, "baseColour"] = "Teal Blue"
        items.loc[6, "baseColour"] = "Teal Blue"
        items.loc[4, "season"] = "Monsoon"
        items.loc[9, "title"] = "NA"
        items.loc[31, "title"] = " na "

    return edit(cat, change)


def defaults(**overrides) -> ValidateConfig:
    """The shipped defaults (params.yaml), with the tests' small taxonomy."""
    return ValidateConfig(allowed_values=config().allowed_values, **overrides)


def run_defaults(cat: Catalogue, tmp_path: Path, **overrides):
    out = tmp_path / "validated"
    outputs = ValidateOutputs(catalogue=out, report=tmp_path / "report.md", metrics=tmp_path / "metrics.json")
    return run_validation(defaults(**overrides), ValidateInputs(catalogue=cat.root), outputs, StageContext(project_dir=tmp_path, progress=False))


def test_a_real_export_passes_by_default_with_counted_warnings_and_quarantined_placeholders(tiny_catalogue, tmp_path):
    cat = _real_export_like(tiny_catalogue(48))
    summary = run_defaults(cat, tmp_path)
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (48, 46, 2)
    assert (summary.rows_ok, summary.rows_warned) == (43, 3)  # rows 2, 4, 6 kept with warnings
    assert summary.quarantined_by_reason == {"title_not_placeholder": 2}
    assert summary.checks_failed == ["title_not_placeholder"]
    assert sorted(summary.warnings) == ["attribute_in_set:baseColour", "attribute_in_set:season"]
    assert summary.result.unseen_values == {"baseColour": {"Teal Blue": 2, "Lime Green": 1}, "season": {"Monsoon": 1}}
    out = Catalogue.load(tmp_path / "validated")
    assert {"1002", "1004", "1006"} <= set(out.items["id"]) and not {"1009", "1031"} & set(out.items["id"])
    quarantine = pd.read_csv(tmp_path / "validated" / QUARANTINE_FILE, dtype=str)
    assert dict(zip(quarantine["id"], quarantine["reasons"])) == {"1009": "title_not_placeholder: 'NA'", "1031": "title_not_placeholder: 'na'"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["rows_ok"], metrics["rows_warned"], metrics["rows_quarantined"]) == (43, 3, 2)
    assert metrics["quarantined_by_reason"] == {"title_not_placeholder": 2}
    assert metrics["unseen_values"]["baseColour"] == {"Teal Blue": 2, "Lime Green": 1}
    report = (tmp_path / "report.md").read_text()
    assert "rows out: 46 (43 ok, 3 with warnings)" in report and "rows quarantined: 2 (title_not_placeholder: 2)" in report
    assert "| baseColour | 3 | 'Teal Blue' x2, 'Lime Green' x1 |" in report and "| season | 1 | 'Monsoon' x1 |" in report
    assert "48 rows in: 43 ok, 3 kept with warnings, 2 quarantined (title_not_placeholder: 2)" == summary.counts_line()


def test_strict_unseen_values_fail_naming_column_and_values(tiny_catalogue, tmp_path):
    cat = _real_export_like(tiny_catalogue(48))
    with pytest.raises(ValidationFailed) as err:
        run_defaults(cat, tmp_path, unseen_values="fail")
    message = str(err.value)
    assert "validate.unseen_values is fail: baseColour: 'Teal Blue' x2, 'Lime Green' x1; season: 'Monsoon' x1" in message
    assert "attribute_in_set:baseColour (expect_column_values_to_be_in_set): 3 row(s)" in message
    assert not (tmp_path / "validated" / CATALOGUE_FILE).exists()
    assert "FAILED" in (tmp_path / "report.md").read_text()


def test_explicit_fail_mode_fails_on_placeholder_titles_only(tiny_catalogue, tmp_path):
    cat = _real_export_like(tiny_catalogue(48))
    with pytest.raises(ValidationFailed) as err:
        run_defaults(cat, tmp_path, on_error="fail")
    assert [c.name for c in err.value.result.failed] == ["title_not_placeholder"]  # unseen values still only warn
    assert not (tmp_path / "validated" / CATALOGUE_FILE).exists()


def test_unseen_values_can_be_quarantined_per_row(tiny_catalogue, tmp_path):
    cat = _real_export_like(tiny_catalogue(48))
    summary = run_defaults(cat, tmp_path, unseen_values="quarantine", max_quarantine_fraction=0.2)
    assert summary.rows_quarantined == 5 and summary.rows_warned == 0
    assert summary.quarantined_by_reason == {"attribute_in_set:baseColour": 3, "attribute_in_set:season": 1, "title_not_placeholder": 2}


def test_a_quarantine_above_the_cap_fails(tiny_catalogue, tmp_path):
    cat = _real_export_like(tiny_catalogue(48))  # 2 of 48 = 4.2% quarantined
    with pytest.raises(ValidationFailed, match=r"2 of 48 rows \(4\.2%\) would be quarantined, more than validate.max_quarantine_fraction 0.04"):
        run_defaults(cat, tmp_path, max_quarantine_fraction=0.04)
    assert not (tmp_path / "validated" / CATALOGUE_FILE).exists()


def test_the_report_gives_the_aspect_ratio_distribution(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(6)  # 48 x 48 squares
    for i in (1, 2, 4):
        Image.new("RGB", (60, 80), (i * 40, 90, 90)).save(cat.root / "images" / f"{i}.png")
    summary = run_defaults(cat, tmp_path)
    geometry = summary.result.geometry
    assert geometry["buckets"]["portrait 3:4 (0.70-0.90)"] == 3 and geometry["buckets"]["square (0.90-1.11)"] == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["geometry"]["images"] == 6
    report = (tmp_path / "report.md").read_text()
    assert "## Image geometry" in report and "| portrait 3:4 (0.70-0.90) | 3 | 50.0% |" in report and "| square (0.90-1.11) | 3 | 50.0% |" in report
