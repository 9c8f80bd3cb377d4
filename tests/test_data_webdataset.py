"""WebDataset shards: deterministic export, import with reported skips, round trip, shard specs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_image

from lightclip.data.catalogue import COLUMNS, CatalogueError
from lightclip.data.webdataset import expand_shards, export_webdataset, import_webdataset


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def with_splits(catalogue):
    items = catalogue.items.copy()
    items["split"] = [("train", "val", "test")[i % 3] for i in range(len(items))]
    items.loc[1, "usage"] = None
    return catalogue.with_items(items).save()


def test_export_layout_and_determinism(tiny_catalogue, tmp_path: Path):
    catalogue = with_splits(tiny_catalogue(12))
    shards = export_webdataset(catalogue, tmp_path / "a", shard_size=5)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == ["1000.json", "1000.png", "1000.txt"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
        meta = json.loads(tar.extractfile("1001.json").read())
        assert tar.extractfile("1000.txt").read().decode() == catalogue.items.loc[0, "title"]
    assert meta == {"id": "1001", "gender": "Women", "masterCategory": "Apparel", "subCategory": "Dress",
                    "articleType": "Dresses", "baseColour": "Blue", "season": "Summer", "year": 2015,
                    "usage": None, "split": "val"}

    # same catalogue -> byte-identical shards, whatever the row order of the table
    shuffled = catalogue.with_items(catalogue.items.iloc[::-1])
    again = export_webdataset(shuffled, tmp_path / "b", shard_size=5)
    assert [md5(p) for p in shards] == [md5(p) for p in again]

    with pytest.raises(CatalogueError, match="pass overwrite=True"):
        export_webdataset(catalogue, tmp_path / "a", shard_size=5)
    fewer = export_webdataset(catalogue, tmp_path / "a", shard_size=100, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["shard-000000.tar"] == [p.name for p in fewer]

    val = export_webdataset(catalogue, tmp_path / "val", split="val", prefix="val")
    with tarfile.open(val[0]) as tar:
        assert len(tar.getnames()) == 3 * 4


def test_round_trip(tiny_catalogue, tmp_path: Path):
    catalogue = with_splits(tiny_catalogue(12))
    shards = export_webdataset(catalogue, tmp_path / "shards", shard_size=5)
    imported, report = import_webdataset(str(tmp_path / "shards" / "shard-{000000..000002}.tar"), tmp_path / "back", progress=False)
    assert report.source.startswith("3 shards: ")
    assert report.skipped == [] and report.notes == [] and report.items_written == 12
    left = catalogue.items.sort_values("id").reset_index(drop=True)
    right = imported.items.sort_values("id").reset_index(drop=True)
    columns = [c for c in COLUMNS if c != "image"]
    pd.testing.assert_frame_equal(left[columns], right[columns])
    for a, b in zip(left["image"], right["image"]):
        assert (imported.root / b).read_bytes() == (catalogue.root / a).read_bytes()
    assert not (tmp_path / "back" / ".pending").exists()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_import_reports_missing_caption_and_image(tmp_path: Path):
    png = make_image(tmp_path / "x.png").read_bytes()
    jpg = make_image(tmp_path / "x.jpg", fmt="JPEG").read_bytes()
    shard = write_tar(
        tmp_path / "mixed.tar",
        {
            "ok.jpeg": jpg,
            "ok.txt": b"  Fine Shirt ",
            "ok.json": json.dumps({"id": "p.1", "year": "2014", "url": "http://x", "split": "train"}).encode(),
            "fromjson.png": png,
            "fromjson.json": json.dumps({"caption": "From Json"}).encode(),
            "nocap.png": png,
            "nocap.json": b'{"id": "n1"}',
            "noimg.txt": b"Lonely caption",
            "noimg.cls": b"3",
            "badsplit.png": png,
            "badsplit.txt": b"x",
            "badsplit.json": b'{"split": "dev"}',
            "README": b"no extension",
        },
    )
    catalogue, report = import_webdataset([shard], tmp_path / "out", progress=False)
    assert catalogue.items["id"].tolist() == ["p.1", "fromjson"]
    assert catalogue.items["title"].tolist() == ["Fine Shirt", "From Json"]
    assert catalogue.items["image"].tolist() == ["images/p_1.jpg", "images/fromjson.png"]
    assert catalogue.items["year"].tolist()[0] == 2014 and catalogue.items["split"].tolist()[0] == "train"
    assert [(s.source, s.id, s.reason.split(":")[0]) for s in report.skipped] == [
        ("mixed.tar:nocap", "n1", "missing_caption"),
        ("mixed.tar:noimg", "noimg", "missing_image"),
        ("mixed.tar:badsplit", "badsplit", "bad_split"),
    ]
    notes = "\n".join(report.notes)
    assert "members_without_key_or_extension: 1" in notes and "mixed.tar:README" in notes
    assert "ignored_members: .cls x 1" in notes and "ignored_json_keys: url x 1" in notes
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["fromjson.png", "p_1.jpg"]


def test_expand_shards(tmp_path: Path):
    for i in range(3):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(expand_shards(str(tmp_path / "shard-{000000..000002}.tar"))) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert names(expand_shards(str(tmp_path / "shard-00000{0,2}.tar"))) == ["shard-000000.tar", "shard-000002.tar"]
    assert names(expand_shards(str(tmp_path / "shard-*.tar"))) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    both = f"{tmp_path}/shard-000000.tar::{tmp_path}/shard-00000[12].tar"
    assert names(expand_shards(both)) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with pytest.raises(CatalogueError, match=r"1 name\(s\) match no file: .*shard-000003.tar"):
        expand_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    with pytest.raises(CatalogueError, match="match no file"):
        expand_shards(str(tmp_path / "other-*.tar"))
    with pytest.raises(CatalogueError, match="unbalanced braces"):
        expand_shards(str(tmp_path / "shard-{0..2.tar"))
