"""WebDataset tar shards: the format ``open_clip_train`` streams, exported from and imported into catalogues.

A sample is the tar members sharing a key: ``<key>.jpg|png|webp`` (the original image bytes),
``<key>.txt`` (the title) and ``<key>.json`` (id, attributes, split). WebDataset splits a member
name into key and extension at the first dot of its base name, so keys never contain dots.
Export is deterministic (sorted samples, fixed tar headers): the same catalogue always gives
byte-identical shards, which keeps DVC from seeing changes that are not there.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import tarfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from lightclip.config import ATTRIBUTE_COLUMNS
from lightclip.data._images import IMAGE_EXTENSIONS, NameAllocator, format_ids, image_extension, parse_year, staged_output
from lightclip.data.catalogue import SPLITS, Catalogue, CatalogueError, ImportReport, SkippedRow, new_catalogue
from lightclip.io import atomic_file

IMAGES_DIR = "images"
#: Image member extensions in the order an importer prefers them when a sample has several.
IMAGE_MEMBER_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Keys of a sample's ``.json`` that the importer reads; others are counted in the report notes.
JSON_KEYS: tuple[str, ...] = ("id", "title", "caption") + ATTRIBUTE_COLUMNS + ("split",)
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_INNER_BRACES = re.compile(r"\{([^{}]*)\}")

__all__ = ["expand_shards", "export_webdataset", "import_webdataset", "shard_name"]


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


# ---------------------------------------------------------------- export


def _json_value(value: Any, column: str) -> Any:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return int(value) if column == "year" else str(value)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata (mtime 0, root, no user names) so output is reproducible."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def export_webdataset(
    catalogue: Catalogue,
    out_dir: Path,
    *,
    split: str | None = None,
    shard_size: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``catalogue`` (or one split of it) as ``<prefix>-000000.tar``, ... and return the shard paths.

    Keys come from the ids (made safe and unique); samples are in key order, so the shards do
    not depend on the row order of the table. Existing shards with the same prefix are an error
    unless ``overwrite``, in which case all of them are replaced (no stale shard survives).
    """
    if shard_size < 1:
        raise CatalogueError(f"shard_size must be at least 1, got {shard_size}")
    if not _PREFIX.fullmatch(prefix):
        raise CatalogueError(f"shard prefix {prefix!r} must be made of letters, digits, '_', '-' and '.'")
    items = catalogue.items if split is None else catalogue.split(split)
    if items.empty:
        what = f"split {split!r} of " if split else ""
        raise CatalogueError(f"{catalogue.root}: {what}the catalogue has no items to export")

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CatalogueError(f"{out_dir}: output path exists and is not a directory")
    shard_pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    existing = sorted(p for p in out_dir.glob(f"{prefix}-*.tar") if shard_pattern.fullmatch(p.name)) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise CatalogueError(f"{out_dir}: holds {len(existing)} '{prefix}-*.tar' shard(s) already; pass overwrite=True to replace them")

    # Keys from ids in id order, then samples in key order: independent of the table's row order.
    allocator = NameAllocator()
    ordered = items.sort_values("id", kind="stable")
    keyed = [(allocator.allocate(row["id"]), row) for _, row in ordered.iterrows()]
    keyed.sort(key=lambda pair: pair[0])

    samples = []
    for key, row in keyed:
        image = catalogue.image_path(row["image"])
        ext = image_extension(image)
        if ext is None:
            raise CatalogueError(
                f"{catalogue.root}: item {row['id']}: image {row['image']} is not one of {sorted(IMAGE_EXTENSIONS)}; "
                "WebDataset export keeps the original bytes"
            )
        if not image.is_file():
            raise CatalogueError(f"{catalogue.root}: item {row['id']}: image {row['image']} not found ({image})")
        meta = {"id": str(row["id"])} | {col: _json_value(row[col], col) for col in ATTRIBUTE_COLUMNS}
        meta["split"] = _json_value(row["split"], "split")
        samples.append((key, image, ext, str(row["title"]), meta))

    # All shards are written under temporary names first and replace their predecessors together
    # when the block ends: a failure removes every temporary file and leaves the old set intact.
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = [out_dir / shard_name(prefix, i) for i in range(-(-len(samples) // shard_size))]
    with ExitStack() as shards:
        for index, path in enumerate(written):
            tmp = shards.enter_context(atomic_file(path))
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for key, image, ext, title, meta in samples[index * shard_size : (index + 1) * shard_size]:
                    members = {ext.lstrip("."): image.read_bytes()}
                    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
                    members["txt"] = title.encode("utf-8")
                    for member_ext in sorted(members):  # a sample's members stay together, in a fixed order
                        _tar_add(tar, f"{key}.{member_ext}", members[member_ext])
    for stale in sorted(set(existing) - set(written)):
        stale.unlink()
    return written


# ---------------------------------------------------------------- shard specs


def _expand_braces(spec: str) -> list[str]:
    """Bash-style ``{a,b}`` and ``{000..009}`` (zero padding kept) expansion, innermost first."""
    match = _INNER_BRACES.search(spec)
    if match is None:
        if "{" in spec or "}" in spec:
            raise CatalogueError(f"shard spec {spec!r}: unbalanced braces")
        return [spec]
    body = match.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
        first, last = numbers.groups()
        padded = (len(first) > 1 and first[0] == "0") or (len(last) > 1 and last[0] == "0")
        width = max(len(first), len(last)) if padded else 0
        lo, hi = int(first), int(last)
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise CatalogueError(f"shard spec {spec!r}: cannot expand {{{body}}}; use {{a,b}} or {{000..009}}")
    expanded: list[str] = []
    for option in options:
        expanded.extend(_expand_braces(spec[: match.start()] + option + spec[match.end() :]))
    return expanded


def expand_shards(spec: str) -> list[Path]:
    """Paths of the shards named by ``spec``: brace ranges/lists, globs, ``::`` between several specs.

    Every name must exist and every glob must match something: a typo is an error, not a
    smaller training set.
    """
    paths: list[Path] = []
    missing: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        for pattern in _expand_braces(os.path.expanduser(part)):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    missing.append(pattern)
                paths.extend(Path(m) for m in matches if os.path.isfile(m))
            elif os.path.isfile(pattern):
                paths.append(Path(pattern))
            else:
                missing.append(pattern)
    if missing:
        raise CatalogueError(f"shard spec {spec!r}: {len(missing)} name(s) match no file: {format_ids(missing, limit=5)}")
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise CatalogueError(f"shard spec {spec!r} names no shard")
    return unique


# ---------------------------------------------------------------- import


def _split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` the way WebDataset splits a member name: at the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


class _ShardReader:
    """Reads one shard, grouping members by key; image bytes go straight to a pending file on disk."""

    def __init__(self, shard: Path, pending: Path, counter: Iterable[int]) -> None:
        self.shard = shard
        self.pending = pending
        self.counter = iter(counter)
        self.samples: dict[str, dict[str, Any]] = {}
        self.bad_members: list[str] = []
        self.duplicates: list[str] = []
        self.ignored_types = 0

    def read(self) -> dict[str, dict[str, Any]]:
        try:
            with tarfile.open(self.shard, "r:*") as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    if not member.isfile():
                        self.ignored_types += 1
                        continue
                    parts = _split_member(member.name)
                    if parts is None:
                        self.bad_members.append(member.name)
                        continue
                    key, ext = parts
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    sample = self.samples.setdefault(key, {})
                    if ext in IMAGE_MEMBER_EXTENSIONS:
                        pending = self.pending / str(next(self.counter))
                        pending.write_bytes(data)
                        data = pending
                    if ext in sample:  # the same key and extension twice: keep the first, say so
                        self.duplicates.append(f"{key}.{ext}")
                        if isinstance(data, Path):
                            data.unlink()
                        continue
                    sample[ext] = data
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CatalogueError(f"{self.shard}: not a readable tar shard: {exc}") from None
        return self.samples


@dataclass
class _Findings:
    """What an import noticed without skipping a sample; it all ends up in the report notes."""

    bad_members: list[str] = field(default_factory=list)
    duplicate_members: list[str] = field(default_factory=list)
    several_images: list[str] = field(default_factory=list)
    bad_years: list[str] = field(default_factory=list)
    ignored_exts: Counter = field(default_factory=Counter)
    ignored_json_keys: Counter = field(default_factory=Counter)
    ignored_types: int = 0

    def notes(self) -> list[str]:
        notes = []
        if self.bad_members:
            notes.append(f"members_without_key_or_extension: {len(self.bad_members)} ignored ({format_ids(self.bad_members, 20)})")
        if self.ignored_types:
            notes.append(f"non_file_members: {self.ignored_types} links or special members ignored")
        if self.duplicate_members:
            shown = format_ids(self.duplicate_members, 20)
            notes.append(f"duplicate_members: {len(self.duplicate_members)} repeated members ignored, first kept ({shown})")
        if self.several_images:
            notes.append(f"samples_with_several_images: {len(self.several_images)} ({format_ids(self.several_images, 20)})")
        if self.ignored_exts:
            notes.append("ignored_members: " + ", ".join(f".{e} x {n}" for e, n in sorted(self.ignored_exts.items())))
        if self.ignored_json_keys:
            notes.append("ignored_json_keys: " + ", ".join(f"{k} x {n}" for k, n in sorted(self.ignored_json_keys.items())))
        if self.bad_years:
            notes.append(f"year_not_integer: {len(self.bad_years)} samples imported with year null ({format_ids(self.bad_years)})")
        return notes


def _sample_record(key: str, sample: dict[str, Any], where: str, found: _Findings) -> tuple[dict[str, Any], str] | SkippedRow:
    """``(record without image, image extension)`` for a usable sample, else the SkippedRow."""
    image_exts = [e for e in IMAGE_MEMBER_EXTENSIONS if e in sample]
    if len(image_exts) > 1:
        found.several_images.append(f"{where} ({'/'.join(image_exts)}, used {image_exts[0]})")
    found.ignored_exts.update(e for e in sample if e not in IMAGE_MEMBER_EXTENSIONS and e not in ("txt", "json"))
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return SkippedRow(where, key, f"bad_row: {key}.json is not valid JSON ({exc})")
        if not isinstance(meta, dict):
            return SkippedRow(where, key, f"bad_row: {key}.json is a {type(meta).__name__}, expected an object")
        found.ignored_json_keys.update(k for k in meta if k not in JSON_KEYS)
    item_id = _text(meta.get("id")) or key
    caption = None
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8").strip() or None
        except UnicodeDecodeError:
            return SkippedRow(where, item_id, f"bad_row: {key}.txt is not UTF-8 text")
    caption = caption or _text(meta.get("title")) or _text(meta.get("caption"))
    split = _text(meta.get("split"))
    if not image_exts:
        present = ", ".join(f".{e}" for e in sorted(sample)) or "nothing"
        return SkippedRow(where, item_id, f"missing_image: no jpg/jpeg/png/webp member (has {present})")
    if caption is None:
        return SkippedRow(where, item_id, "missing_caption: no .txt and no title/caption in .json")
    if split is not None and split not in SPLITS:
        return SkippedRow(where, item_id, f"bad_split: {split!r} is not one of {list(SPLITS)}")
    record: dict[str, Any] = {"id": item_id, "title": caption, "split": split}
    record.update({col: _text(meta.get(col)) for col in ATTRIBUTE_COLUMNS})
    year, invalid = parse_year(meta.get("year"))
    if invalid:
        found.bad_years.append(f"{item_id}={meta.get('year')!r}")
    record["year"] = year
    return record, image_exts[0]


def import_webdataset(
    shards: Sequence[Path | str] | str | Path, out_dir: Path, *, overwrite: bool = False, progress: bool = True
) -> tuple[Catalogue, ImportReport]:
    """Import WebDataset shards into a catalogue in ``out_dir`` (images copied to ``out_dir/images/``).

    Image from ``jpg``/``jpeg``/``png``/``webp``, caption from ``.txt`` (else the json ``title``
    or ``caption``), id from the json ``id`` (else the key), attributes and split from the json.
    Skipped samples (``missing_image``, ``missing_caption``, ``bad_row``, ``bad_split``,
    ``duplicate_id``) are listed in the report with ``source="<tar>:<key>"``. ``shards`` is a
    list of tar paths, one path, or a spec string for :func:`expand_shards`.
    """
    if isinstance(shards, str):
        paths = expand_shards(shards)
    elif isinstance(shards, Path):
        paths = [shards]
    else:
        paths = [Path(s) for s in shards]
    if not paths:
        raise CatalogueError("no shards given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CatalogueError(f"shard(s) not found: {format_ids(missing, limit=5)}")
    source = str(paths[0]) if len(paths) == 1 else f"{len(paths)} shards: {paths[0]} .. {paths[-1]}"
    report = ImportReport(source=source)
    found = _Findings()
    names = NameAllocator()
    seen: dict[str, str] = {}
    records: list[dict[str, Any]] = []

    with staged_output(out_dir, overwrite=overwrite, inputs=paths) as staging:
        images = staging / IMAGES_DIR
        images.mkdir()
        pending = staging / ".pending"  # image bytes wait here until their sample is complete
        pending.mkdir()
        counter = iter(range(1 << 62))
        with tqdm(desc="importing shards", unit="sample", disable=not progress, leave=False) as bar:
            for shard in paths:
                reader = _ShardReader(shard, pending, counter)
                samples = reader.read()
                found.bad_members.extend(f"{shard.name}:{m}" for m in reader.bad_members)
                found.duplicate_members.extend(f"{shard.name}:{m}" for m in reader.duplicates)
                found.ignored_types += reader.ignored_types
                for key, sample in samples.items():
                    bar.update(1)
                    report.rows_read += 1
                    where = f"{shard.name}:{key}"
                    result = _sample_record(key, sample, where, found)
                    if isinstance(result, tuple) and result[0]["id"] in seen:
                        item_id = result[0]["id"]
                        result = SkippedRow(where, item_id, f"duplicate_id: id {item_id} already at {seen[item_id]}")
                    if isinstance(result, SkippedRow):
                        report.skipped.append(result)
                        continue
                    record, image_ext = result
                    seen[record["id"]] = where
                    target = names.allocate(record["id"], IMAGE_EXTENSIONS["." + image_ext])
                    os.rename(sample[image_ext], images / target)  # unique names: nothing is overwritten
                    records.append(record | {"image": f"{IMAGES_DIR}/{target}"})
                for leftover in pending.iterdir():  # images of skipped samples, extra images
                    leftover.unlink()
        shutil.rmtree(pending)

        report.notes.extend(found.notes())
        catalogue = new_catalogue(staging, records)
        report.items_written = len(catalogue)
        if not records:
            report.notes.append("no items imported: every sample was skipped (see skipped)")
        report.write(staging / "import_report.json")
    return Catalogue(root=Path(out_dir), items=catalogue.items), report
