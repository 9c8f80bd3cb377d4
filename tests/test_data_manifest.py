"""The generic CSV/JSONL manifest importer: aliases, skipped records, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_image
from mlflow import MlflowClient

from lightclip.cli import main as cli_main
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.data.manifest import import_manifest
from lightclip.tracking import PARENT_RUN_ENV, default_tracking_uri


@pytest.fixture
def pics(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_image(root / "pics" / "a.png", colour=(10, 20, 30))
    make_image(root / "pics" / "b.jpeg", colour=(40, 50, 60), fmt="JPEG")
    make_image(root / "pics" / "c d.png", colour=(70, 80, 90))
    return root


def reasons(report) -> list[tuple[str, str | None, str]]:
    return [(s.source, s.id, s.reason.split(":")[0]) for s in report.skipped]


def test_csv_manifest_with_aliases_and_skips(pics: Path, tmp_path: Path):
    manifest = pics / "items.csv"
    manifest.write_text(
        "filepath,caption,id,baseColour,year,split\n"
        "pics/a.png,Red Shirt,A1,Red,2015,train\n"  # line 2
        "pics/b.jpeg,Blue Shoe,,Blue,2016.0,val\n"  # 3: id derived from the row number
        "pics/c d.png,  Grey Bag  ,C/3,,,\n"  # 4: odd id, empty attributes
        "pics/nope.png,Ghost,D4,,,\n"  # 5: missing image
        "https://example.com/x.jpg,Remote,E5,,,\n"  # 6: URL
        "pics/a.png,Shirt Again,F6,,,training\n"  # 7: bad split
        "pics/a.png,,G7,,,\n"  # 8: empty caption
        "pics/a.png,Short\n"  # 9: wrong width
        "pics/a.png,Dup,A1,,,\n"  # 10: duplicate id
        "pics/a.png,Odd year,H8,,soon,test\n",  # 11: year becomes null, noted
        encoding="utf-8",
    )
    catalogue, report = import_manifest(manifest, tmp_path / "out", progress=False)
    items = catalogue.items.set_index("id")
    assert items.index.tolist() == ["A1", "row2", "C/3", "H8"]
    assert items.loc["row2", "title"] == "Blue Shoe" and items.loc["row2", "year"] == 2016
    assert items.loc["row2", "image"] == "images/row2.jpg"
    assert items.loc["C/3", "title"] == "Grey Bag" and items.loc["C/3", "image"] == "images/C_3.png"
    assert pd.isna(items.loc["C/3", "baseColour"]) and pd.isna(items.loc["C/3", "split"])
    assert items["split"].tolist()[:2] == ["train", "val"] and pd.isna(items.loc["H8", "year"])
    assert reasons(report) == [
        ("items.csv:5", "D4", "missing_image"),
        ("items.csv:6", "E5", "remote_image"),
        ("items.csv:7", "F6", "bad_split"),
        ("items.csv:8", "G7", "empty_title"),
        ("items.csv:9", None, "bad_row"),
        ("items.csv:10", "A1", "duplicate_id"),
    ]
    assert report.rows_read == 10 and report.items_written == 4
    assert any("year_not_integer: 1" in n and "H8='soon'" in n for n in report.notes)
    out = tmp_path / "out"
    assert (out / "images" / "row2.jpg").read_bytes() == (pics / "pics" / "b.jpeg").read_bytes()
    assert Catalogue.load(out).items.equals(catalogue.items)
    assert json.loads((out / "import_report.json").read_text())["items_written"] == 4


def test_jsonl_manifest_with_image_root_and_bad_lines(pics: Path, tmp_path: Path):
    manifest = tmp_path / "m.jsonl"
    lines = [
        json.dumps({"image_path": "a.png", "text": "Red Shirt", "id": 7, "gender": "Men", "year": 2012}),
        "{not json",
        "",
        json.dumps(["a list"]),
        json.dumps({"path": "b.jpeg", "title": "Blue Shoe", "split": "test"}),
        json.dumps({"image": "missing.png", "title": "Ghost"}),
        json.dumps({"image": "http://host/a.png", "caption": "Remote"}),
        json.dumps({"image": "a.png", "title": "Nested", "usage": {"a": 1}}),
    ]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    catalogue, report = import_manifest(manifest, tmp_path / "out", image_root=pics / "pics", progress=False)
    assert catalogue.items["id"].tolist() == ["7", "row4"]  # record 4: blank lines are not records
    assert catalogue.items["gender"].tolist()[0] == "Men" and catalogue.items["year"].tolist()[0] == 2012
    assert catalogue.items["split"].tolist()[1] == "test"
    assert reasons(report) == [
        ("m.jsonl:2", None, "bad_row"),
        ("m.jsonl:4", None, "bad_row"),
        ("m.jsonl:6", "row5", "missing_image"),
        ("m.jsonl:7", "row6", "remote_image"),
        ("m.jsonl:8", None, "bad_row"),
    ]
    assert "line 2: invalid JSON" in report.skipped[0].reason


def test_unknown_column_or_format_is_an_error(pics: Path, tmp_path: Path):
    manifest = pics / "items.csv"
    manifest.write_text("image,title,colour\npics/a.png,Red,Red\n")
    with pytest.raises(CatalogueError, match=r"items.csv:1: unknown column\(s\) \['colour'\]; allowed: .*'baseColour'"):
        import_manifest(manifest, tmp_path / "out", progress=False)
    jsonl = pics / "items.jsonl"
    jsonl.write_text(json.dumps({"image": "pics/a.png", "title": "x", "price": 3}) + "\n")
    with pytest.raises(CatalogueError, match=r"items.jsonl:1: unknown key\(s\) \['price'\]"):
        import_manifest(jsonl, tmp_path / "out", progress=False)
    both = pics / "both.csv"
    both.write_text("image,path,title\na,b,c\n")
    with pytest.raises(CatalogueError, match="'image' and 'path' both give the image"):
        import_manifest(both, tmp_path / "out", progress=False)
    no_title = pics / "nt.csv"
    no_title.write_text("image\npics/a.png\n")
    with pytest.raises(CatalogueError, match=r"no title column; name it one of \['title', 'caption', 'text'\]"):
        import_manifest(no_title, tmp_path / "out", progress=False)
    with pytest.raises(CatalogueError, match=r"unknown manifest format '.parquet'"):
        import_manifest(pics / "items.parquet", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unclosed_quote_costs_its_own_line_only(pics: Path, tmp_path: Path):
    """Line 3 opens a quote it never closes: once the rest of the file vanished into its caption."""
    manifest = pics / "items.csv"
    rows = ["pics/a.png,Red Shirt,A1", 'pics/a.png,"Blue Shirt,A2', "", "pics/a.png,Green Shirt,A3"]
    rows += [f"pics/b.jpeg,Shoe {i},S{i}" for i in range(4, 9)]
    manifest.write_text("image,title,id\n" + "\n".join(rows) + "\n", encoding="utf-8")
    catalogue, report = import_manifest(manifest, tmp_path / "out", progress=False)

    physical_data_lines = len(manifest.read_text().splitlines()) - 1
    assert report.items_written + len(report.skipped) + report.blank_lines == physical_data_lines == report.lines_read == 9
    assert catalogue.items["id"].tolist() == ["A1", "A3", "S4", "S5", "S6", "S7", "S8"]
    assert reasons(report) == [("items.csv:3", None, "bad_row")]
    assert report.skipped[0].reason == "bad_row: line 3: field 2 opens a quote that is not closed on this line (a quoted field cannot span lines)"
    assert report.blank_lines == 1 and "(1 blank line not counted)" in report.summary()
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["lines_read"] == 9


def test_a_quoted_caption_on_one_line_is_fine_and_a_bare_cr_is_a_bad_row(pics: Path, tmp_path: Path):
    manifest = pics / "items.csv"
    manifest.write_bytes(b'image,title\r\npics/a.png,"Red, ""bright"" Shirt"\r\npics/a.png,Half\rline\r\n')
    catalogue, report = import_manifest(manifest, tmp_path / "out", progress=False)
    assert catalogue.items["title"].tolist() == ['Red, "bright" Shirt']
    assert reasons(report) == [("items.csv:3", None, "bad_row")] and "carriage return" in report.skipped[0].reason


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_non_utf8_byte_is_named_by_line_and_column(suffix: str, pics: Path, tmp_path: Path):
    manifest = pics / f"items{suffix}"
    if suffix == ".csv":
        lines = [b"image,title", b"pics/a.png,Red Shirt", "pics/a.png,Café Shirt".encode("latin-1")]
        column = len("pics/a.png,Caf") + 1
    else:
        lines = [json.dumps({"image": "pics/a.png", "title": "Red"}).encode(), '{"image": "pics/a.png", "title": "Café"}'.encode("cp1252")]
        lines.insert(0, b"")
        column = len('{"image": "pics/a.png", "title": "Caf') + 1
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CatalogueError, match=rf"items{suffix}:3: not UTF-8 text: byte 0xe9 at column {column} "):
        import_manifest(manifest, tmp_path / "out", progress=False)


def test_images_outside_the_image_root_are_refused_unless_allowed(pics: Path, tmp_path: Path):
    secret = make_image(tmp_path / "elsewhere" / "secret.png", colour=(1, 2, 3))
    (pics / "pics" / "link-out.png").symlink_to(secret)
    (pics / "pics" / "link-in.png").symlink_to("a.png")
    manifest = pics / "items.csv"
    manifest.write_text(
        "image,title,id\n"
        "pics/a.png,Inside,A\n"  # line 2
        f"{secret},Absolute,B\n"  # 3
        "../elsewhere/secret.png,Dot dot,C\n"  # 4
        "pics/link-out.png,Link out,D\n"  # 5
        "pics/link-in.png,Link in,E\n"  # 6
        f"{pics / 'pics' / 'b.jpeg'},Absolute inside,F\n",  # 7
        encoding="utf-8",
    )
    catalogue, report = import_manifest(manifest, tmp_path / "out", progress=False)
    assert catalogue.items["id"].tolist() == ["A", "E", "F"]
    assert reasons(report) == [("items.csv:3", "B", "outside_root"), ("items.csv:4", "C", "outside_root"), ("items.csv:5", "D", "outside_root")]
    real = secret.resolve()
    assert report.skipped[1].reason == f"outside_root: ../elsewhere/secret.png is {real}, outside the image root {pics}"
    assert any(n.startswith("outside_root: 3 row(s)") for n in report.notes)
    copied = [p.read_bytes() for p in (tmp_path / "out" / "images").iterdir()]
    assert secret.read_bytes() not in copied

    allowed, report = import_manifest(manifest, tmp_path / "allowed", allow_outside_root=True, progress=False)
    assert allowed.items["id"].tolist() == ["A", "B", "C", "D", "E", "F"] and report.skipped == []


def _runs(project: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri=default_tracking_uri(project))
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def test_cli_import_needs_no_params_and_the_store_follows_the_project_not_the_params(pics: Path, tmp_path: Path, monkeypatch, capsys):
    """No params.yaml in the working directory: the import runs and logs there; --params elsewhere moves nothing."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)

    def main(argv: list[str]) -> int:
        # each command is a process of its own: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI in this one
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return cli_main(argv)
    manifest = pics / "items.csv"
    manifest.write_text("image,title,id\npics/a.png,Red Shirt,A\n../outside.png,Escapes,B\n", encoding="utf-8")
    make_image(tmp_path / "outside.png")

    assert main(["-q", "data", "import-manifest", str(manifest), "--out", "cat"]) == 0
    out = capsys.readouterr().out
    assert "read 2 rows, wrote 1 items, skipped 1" in out and "outside_root" in out and "--allow-outside-root" in out
    [run] = _runs(work, "lightclip")  # the default experiment: there is no params file
    assert run.info.status == "FINISHED" and run.data.tags["lightclip.stage"] == "import_manifest"
    assert run.data.metrics == {"rows_read": 2.0, "items_written": 1.0, "rows_skipped": 1.0}

    other = tmp_path / "other"
    other.mkdir()
    (other / "p.yaml").write_text("tracking:\n  experiment: elsewhere\n")
    assert main(["--params", "../other/p.yaml", "-q", "data", "import-manifest", str(manifest), "--out", "cat2", "--allow-outside-root"]) == 0
    assert "wrote 2 items, skipped 0" in capsys.readouterr().out
    assert sorted(p.name for p in other.iterdir()) == ["p.yaml"]  # no mlflow/ or .cache/ beside the params file
    assert len(_runs(work, "elsewhere")) == 1  # the params file's experiment, in the working directory's store

    assert main(["--params", "../other/missing.yaml", "-q", "data", "import-manifest", str(manifest), "--out", "cat3"]) == 1
    assert "missing.yaml: params file not found" in capsys.readouterr().err
    assert main(["--project", str(other), "-q", "data", "import-manifest", str(manifest), "--out", "cat4"]) == 0
    assert len(_runs(other, "lightclip")) == 1 and len(_runs(work, "lightclip")) == 1
    assert main(["--project", str(tmp_path / "nowhere"), "-q", "data", "import-manifest", str(manifest), "--out", "cat5"]) == 1
    assert f"--project {tmp_path / 'nowhere'}: not a directory" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
