"""Helpers shared by the importers: staged output directories, safe file names, image copies.

Every importer writes a whole catalogue or nothing: it builds the catalogue in a staging
directory beside ``out_dir`` (:func:`lightclip.io.staged_dir`) that replaces ``out_dir`` at the
end, so an error or an interrupt never leaves half a catalogue behind, and an existing catalogue
is only replaced once its successor is complete.
"""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from lightclip.data.catalogue import CATALOGUE_FILE, Catalogue, CatalogueError, new_catalogue
from lightclip.io import staged_dir

#: Image file extensions the importers and the WebDataset exporter accept, and their canonical form.
IMAGE_EXTENSIONS: dict[str, str] = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png", ".webp": ".webp"}
#: Values of attribute columns that mean "no value" in the Kaggle ``styles.csv``.
NULL_MARKERS: frozenset[str] = frozenset({"", "NA"})

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_STEM = 100


def safe_stem(text: str, fallback: str = "item") -> str:
    """A file-name stem made of ``[A-Za-z0-9_-]`` only (no dots, slashes or leading dashes)."""
    stem = _UNSAFE.sub("_", str(text)).strip("_").lstrip("-")[:_MAX_STEM]
    return stem or fallback


class NameAllocator:
    """Hands out unique file names; unique case-insensitively, so catalogues survive any filesystem."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def allocate(self, text: str, ext: str = "") -> str:
        stem = safe_stem(text)
        name, n = stem + ext, 1
        while name.lower() in self._used:
            n += 1
            name = f"{stem}_{n}{ext}"
        self._used.add(name.lower())
        return name


def image_extension(path: str | Path) -> str | None:
    """The canonical extension (``.jpg``/``.png``/``.webp``) of an image path, or None if unsupported."""
    return IMAGE_EXTENSIONS.get(Path(str(path)).suffix.lower())


def parse_year(value: object) -> tuple[int | None, bool]:
    """``(year, invalid)``: an int for integral values, None for empty ones; ``invalid`` flags junk."""
    if value is None:
        return None, False
    if isinstance(value, bool):
        return None, True
    if isinstance(value, int):
        return value, False
    if isinstance(value, float):
        return (int(value), False) if value.is_integer() else (None, True)
    text = str(value).strip()
    if text == "":
        return None, False
    try:
        return int(text), False
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None, True
    return (int(number), False) if number.is_integer() else (None, True)


def format_ids(ids: Sequence[object], limit: int = 50) -> str:
    """A short comma-separated id list for report notes."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def copy_file_exclusive(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, failing (never overwriting) if ``dst`` already exists."""
    with open(src, "rb") as fsrc, open(dst, "xb") as fdst:
        shutil.copyfileobj(fsrc, fdst, 1 << 20)


def copy_images(jobs: Sequence[tuple[Path, Path]], *, progress: bool = True, desc: str = "copying images") -> None:
    """Copy ``(src, dst)`` pairs with a progress bar; a failing copy names both paths."""
    for src, dst in tqdm(jobs, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            copy_file_exclusive(src, dst)
        except FileExistsError:
            raise CatalogueError(f"{dst}: refusing to overwrite an existing image (copying {src})") from None
        except OSError as exc:
            raise CatalogueError(f"{src}: cannot copy image to {dst}: {exc.strerror or exc}") from None


def _is_inside(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
    except ValueError:
        return False
    return True


def outside_root(path: Path, root: Path) -> Path | None:
    """Where ``path`` really is (symlinks and ``..`` resolved) if that is outside ``root``, else None.

    Importers read and copy only files under the catalogue root unless told otherwise: a
    manifest row or a symlink must not make them copy any file the user can read elsewhere.
    """
    real = Path(path).resolve()
    return None if _is_inside(real, Path(root).resolve()) else real


def outside_root_note(count: int, root: Path) -> str:
    """The report note for rows skipped as ``outside_root``."""
    return (
        f"outside_root: {count} row(s) point at files outside {root} (absolute paths, '..' or symlinks); "
        f"pass allow_outside_root=True (--allow-outside-root) to import them"
    )


def check_output_dir(out_dir: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an ``out_dir`` we must not write: non-empty (unless ``overwrite`` and a catalogue)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CatalogueError(f"{out_dir}: output path exists and is not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise CatalogueError(f"{out_dir}: output directory exists and is not empty; pass overwrite=True to replace a catalogue there")
    if not (out_dir / CATALOGUE_FILE).is_file():
        raise CatalogueError(f"{out_dir}: refusing to replace a non-empty directory that holds no catalogue (no {CATALOGUE_FILE})")
    resolved = out_dir.resolve()
    for source in inputs:
        if _is_inside(Path(source).resolve(), resolved):
            raise CatalogueError(f"{out_dir}: refusing to replace the output directory: it contains the input {source}")


@contextmanager
def staged_output(out_dir: Path, *, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh directory beside ``out_dir``; on success it becomes ``out_dir``, on error it goes."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    with staged_dir(out_dir) as staging:
        yield staging
        check_output_dir(out_dir, overwrite=overwrite)  # again: something may have appeared meanwhile


def finish_import(staging: Path, out_dir: Path | str, records: list[dict], jobs: list[tuple[Path, Path]], report: Any, *, desc: str, progress: bool) -> Any:
    """Copy the images, write the catalogue and ``import_report.json`` into ``staging``; the
    returned catalogue is addressed at ``out_dir``, where :func:`staged_output` moves it."""
    copy_images(jobs, progress=progress, desc=desc)
    catalogue = new_catalogue(staging, records)
    report.items_written = len(catalogue)
    report.check_complete()
    if not records:
        report.notes.append("no items imported: every row was skipped (see skipped)")
    report.write(staging / "import_report.json")
    return Catalogue(root=Path(out_dir), items=catalogue.items)
