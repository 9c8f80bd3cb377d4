"""Physical lines of a text input, decoded one at a time so that every error names its line.

The line-based inputs (a CSV or JSON-lines manifest, the Kaggle ``styles.csv``) hold one record
per physical line. A quoted CSV field may not span lines here (a title or caption is one line of
text): an unclosed quote is an error of its own line only, never a field that swallows the rows
after it. Decoding line by line also lets a non-UTF-8 byte be reported by line and column
rather than by an offset into a decoder's buffer.
"""

from __future__ import annotations

import codecs
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lightclip.data.catalogue import CatalogueError


@dataclass(frozen=True)
class Line:
    """One physical line: its 1-based number and its text without the line end."""

    number: int
    text: str

    @property
    def blank(self) -> bool:
        return not self.text.strip()


class LineError(ValueError):
    """A line that holds no readable record; the message says why (the caller adds the line)."""


def read_lines(path: Path) -> Iterator[Line]:
    """Yield every physical line of ``path`` (``\\n`` or ``\\r\\n`` ends; a UTF-8 BOM is dropped).

    A byte that is not UTF-8 raises :class:`CatalogueError` naming the line, the column and the
    byte; ``OSError`` is left to the caller.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(body[: exc.start].decode("utf-8", errors="replace")) + 1
                raise CatalogueError(
                    f"{path}:{number}: not UTF-8 text: byte 0x{body[exc.start]:02x} at column {column} ({exc.reason}); "
                    f"save the file as UTF-8"
                ) from None
            yield Line(number, text)


def split_csv_line(text: str) -> list[str]:
    """The fields of one CSV line (``,`` separated, ``"`` quoted, ``""`` an escaped quote).

    Raises :class:`LineError` when a quote opened on the line is not closed on it, or when the
    line holds a bare carriage return (a line end inside a record).
    """
    if "\r" in text:
        raise LineError("a carriage return inside the line (a record cannot span lines)")
    # The reader is given the line with its end: a field that ends up holding that "\n" is one
    # whose quote was still open when the line ended.
    fields = next(csv.reader([text + "\n"]), [])
    for index, value in enumerate(fields, start=1):
        if "\n" in value:
            raise LineError(f"field {index} opens a quote that is not closed on this line (a quoted field cannot span lines)")
    return fields
