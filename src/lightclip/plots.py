"""The DVC plots of ``dvc.yaml`` as one self-contained HTML page: inline SVG, no network.

``dvc plots show``/``diff`` write a page that loads Vega from a CDN, so with no network it stays
blank. This module reads the same definitions (the top-level ``plots:`` of ``dvc.yaml``) and the
same data files, draws each plot with matplotlib and inlines the SVGs in one HTML file: no
script, no stylesheet or font to fetch. Like ``dvc plots diff REV``, it can draw the data of git
revisions beside the workspace's (read with ``git show REV:path``).

Definitions understood (DVC's top-level forms):

- ``- path:`` with ``x``, ``y`` (a field or a list), ``template``, ``title``, ``x_label``,
  ``y_label``; ``path`` is a data file or a directory of them (one series per file);
- ``- path`` alone: ``y`` the last column, ``x`` the row number (DVC's ``step``);
- ``- plot id:`` with ``y: {file: field or list}`` (and ``x`` a field or ``{file: field}``).

Data: CSV, TSV, JSON or YAML (a list of records, or a mapping holding one). Templates:
``linear``, ``simple``, ``smooth`` (lines) and ``scatter`` (points, labelled by the first text
column). Anything else is an error naming the plot, and so is a value that is not a number
(file, row, field); a file missing in a compared revision is listed on the page, not dropped.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import matplotlib
import yaml
from matplotlib.figure import Figure

from lightclip.errors import LightclipError
from lightclip.io import atomic_write_bytes

DVC_FILE = "dvc.yaml"
#: Where ``lightclip plots`` writes the page unless told otherwise.
DEFAULT_OUT = "reports/plots.html"
WORKSPACE = "workspace"
LINE_TEMPLATES = ("linear", "simple", "smooth")
TEMPLATES = (*LINE_TEMPLATES, "scatter")
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".yaml", ".yml")
#: x field name when a plot has none: the row number, as DVC's ``step``.
STEP = "step"


class PlotsError(LightclipError, ValueError):
    """A plot definition or data file that cannot be drawn; the message names it."""


@dataclass(frozen=True)
class PlotSpec:
    """One plot of ``dvc.yaml``: its data sources (path -> y fields) and how to draw them."""

    id: str
    sources: dict[str, tuple[str, ...]]  # path (file or directory) -> y fields (empty: the last column)
    x: dict[str, str | None]  # path -> x field (None: the row number)
    template: str = "linear"
    title: str | None = None
    x_label: str | None = None
    y_label: str | None = None


@dataclass
class Series:
    """One line (or set of points) of a plot."""

    revision: str
    file: str
    x_field: str
    y_field: str
    xs: list[float]
    ys: list[float]
    labels: list[str]


@dataclass
class PlotsReport:
    """What was drawn: counts per plot and revision, and what was missing where."""

    out: Path
    revisions: list[str]
    plots: dict[str, int] = field(default_factory=dict)  # plot id -> series drawn
    rows: dict[tuple[str, str], int] = field(default_factory=dict)  # (revision, file) -> rows read
    missing: list[str] = field(default_factory=list)  # "<path> is not in <revision>"

    def summary(self) -> str:
        series = sum(self.plots.values())
        text = (
            f"wrote {self.out}: {len(self.plots)} plot(s), {series} series, {sum(self.rows.values())} rows "
            f"from {len(self.rows)} file(s) ({', '.join(self.revisions)})"
        )
        if self.missing:
            text += f"; {len(self.missing)} missing: " + "; ".join(self.missing)
        return text


# -- definitions -----------------------------------------------------------------------------------


def read_specs(dvc_file: Path) -> list[PlotSpec]:
    """The top-level ``plots:`` of ``dvc_file`` as :class:`PlotSpec` (in file order)."""
    dvc_file = Path(dvc_file)
    try:
        data = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PlotsError(f"{dvc_file}: no such file") from None
    except yaml.YAMLError as exc:
        raise PlotsError(f"{dvc_file}: not valid YAML ({exc})") from None
    entries = data.get("plots") if isinstance(data, dict) else None
    if not entries:
        raise PlotsError(f"{dvc_file}: no top-level `plots:` section (nothing to draw)")
    if isinstance(entries, dict):  # DVC also takes a mapping
        entries = [{key: value} for key, value in entries.items()]
    if not isinstance(entries, list):
        raise PlotsError(f"{dvc_file}: `plots:` must be a list, got {type(entries).__name__}")
    return [_spec(entry, dvc_file, i) for i, entry in enumerate(entries)]


def _spec(entry: Any, dvc_file: Path, index: int) -> PlotSpec:
    where = f"{dvc_file}: plots[{index}]"
    if isinstance(entry, str):
        return PlotSpec(entry, {entry: ()}, {entry: None})
    if not isinstance(entry, dict) or len(entry) != 1:
        raise PlotsError(f"{where}: expected a path or one `id: {{properties}}` mapping, got {entry!r}")
    plot_id, props = next(iter(entry.items()))
    props = props or {}
    if not isinstance(props, dict):
        raise PlotsError(f"{where} ({plot_id}): properties must be a mapping, got {props!r}")
    unknown = sorted(set(props) - {"x", "y", "template", "title", "x_label", "y_label"})
    if unknown:
        raise PlotsError(f"{where} ({plot_id}): unknown properties {unknown}; known: x, y, template, title, x_label, y_label")
    template = str(props.get("template", "linear"))
    if template not in TEMPLATES:
        raise PlotsError(f"{where} ({plot_id}): template {template!r} cannot be drawn offline; supported: {', '.join(TEMPLATES)}")
    y, x = props.get("y"), props.get("x")
    if isinstance(y, dict):
        sources = {str(path): _fields(fields, where) for path, fields in y.items()}
    else:
        sources = {str(plot_id): _fields(y, where) if y is not None else ()}
    if isinstance(x, dict):
        missing = sorted(set(sources) - set(x))
        if missing:
            raise PlotsError(f"{where} ({plot_id}): x names no field for {missing}")
        xs = {path: str(x[path]) for path in sources}
    else:
        xs = {path: None if x is None else str(x) for path in sources}
    return PlotSpec(
        str(plot_id), sources, xs, template,
        title=_text(props.get("title")), x_label=_text(props.get("x_label")), y_label=_text(props.get("y_label")),
    )


def _fields(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PlotsError(f"{where}: y must be a field name or a list of them, got {value!r}")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# -- data at a revision ------------------------------------------------------------------------------


class Tree:
    """Files of the project in the workspace or at a git revision (``git show REV:./path``)."""

    def __init__(self, project: Path, revision: str | None = None) -> None:
        self.project = Path(project)
        self.revision = revision
        self.name = revision or WORKSPACE
        if revision is not None:
            result = self._git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
            if result.returncode != 0:
                raise PlotsError(f"revision {revision!r}: not a commit of the git repository at {self.project}")

    def _git(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(["git", *args], cwd=self.project, capture_output=True, timeout=60)
        except FileNotFoundError:
            raise PlotsError("git is not installed: comparing with a revision needs it") from None

    def files(self, path: str) -> list[str] | None:
        """The data files at ``path`` (itself, or the files of that directory); None if absent."""
        if self.revision is None:
            full = self.project / path
            if full.is_file():
                return [path]
            if full.is_dir():
                return sorted(p.relative_to(self.project).as_posix() for p in full.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
            return None
        kind = self._git("cat-file", "-t", f"{self.revision}:./{path}")
        if kind.returncode != 0:
            return None
        if kind.stdout.strip() == b"blob":
            return [path]
        listing = self._git("ls-tree", "-r", "--name-only", "--full-name", self.revision, "--", path)
        prefix = self._git("rev-parse", "--show-prefix").stdout.decode().strip()
        names = [n[len(prefix):] if n.startswith(prefix) else n for n in listing.stdout.decode().splitlines()]
        return sorted(n for n in names if PurePosixPath(n).suffix in DATA_SUFFIXES)

    def read(self, path: str) -> str:
        where = f"{path} ({self.name})"
        if self.revision is None:
            data = (self.project / path).read_bytes()
        else:
            result = self._git("show", f"{self.revision}:./{path}")
            if result.returncode != 0:
                raise PlotsError(f"{where}: git show failed: {result.stderr.decode(errors='replace').strip()}")
            data = result.stdout
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise PlotsError(f"{where}: line {line}: not UTF-8 text") from None


def read_records(text: str, path: str, revision: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a data file and the line (CSV/TSV) or index (JSON/YAML) each came from."""
    where = f"{path} ({revision})"
    suffix = PurePosixPath(path).suffix
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",", strict=True)
        rows, lines = [], []
        try:
            for row in reader:
                width = len(reader.fieldnames or [])
                if None in row:
                    raise PlotsError(f"{where}: line {reader.line_num}: {width + len(row[None])} fields, the header has {width}")
                if None in row.values():
                    raise PlotsError(f"{where}: line {reader.line_num}: {sum(v is not None for v in row.values())} fields, the header has {width}")
                rows.append(dict(row))
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise PlotsError(f"{where}: line {reader.line_num}: {exc}") from None
        if reader.fieldnames is None:
            raise PlotsError(f"{where}: empty file (no header)")
        return rows, lines
    if suffix in (".json", ".yaml", ".yml"):
        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise PlotsError(f"{where}: not valid {suffix[1:].upper()} ({exc})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise PlotsError(f"{where}: expected a list of records, or a mapping holding one list; got keys {sorted(data)}")
            data = lists[0]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise PlotsError(f"{where}: expected a list of records (mappings)")
        return data, list(range(len(data)))
    raise PlotsError(f"{where}: unsupported data format {suffix or '(no suffix)'}; supported: {', '.join(DATA_SUFFIXES)}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise PlotsError(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PlotsError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise PlotsError(f"{where}: {value!r} is not a finite number")
    return number


def load_series(spec: PlotSpec, tree: Tree, report: PlotsReport) -> list[Series]:
    """Every series of ``spec`` in ``tree``; files absent there are recorded in ``report.missing``."""
    series: list[Series] = []
    for source, y_fields in spec.sources.items():
        files = tree.files(source)
        if not files:
            report.missing.append(f"{source} is not in {tree.name}" if files is None else f"{source} holds no data file in {tree.name}")
            continue
        for path in files:
            rows, positions = read_records(tree.read(path), path, tree.name)
            if not rows:
                raise PlotsError(f"{path} ({tree.name}): no rows")
            columns = list(rows[0])
            fields = y_fields or (columns[-1],)
            x_field = spec.x[source]
            label_field = next((c for c in columns if c not in fields and c != x_field and not _all_numbers(r.get(c) for r in rows)), None)
            for name in (x_field, *fields):
                if name is not None and name not in columns:
                    raise PlotsError(f"{path} ({tree.name}): no field {name!r} (plot {spec.id}); fields: {columns}")
            for y_field in fields:
                xs, ys = [], []
                for row, position in zip(rows, positions):
                    where = f"{path} ({tree.name}): {'line' if path.endswith(('.csv', '.tsv')) else 'record'} {position}"
                    xs.append(float(position) if x_field is None else _number(row.get(x_field), f"{where}, field {x_field!r}"))
                    ys.append(_number(row.get(y_field), f"{where}, field {y_field!r}"))
                labels = [str(r.get(label_field, "")) for r in rows] if label_field else []
                series.append(Series(tree.name, path, x_field or STEP, y_field, xs, ys, labels))
            report.rows[(tree.name, path)] = len(rows)
    return series


def _all_numbers(values: Iterable[Any]) -> bool:
    try:
        for value in values:
            float(value)
    except (TypeError, ValueError):
        return False
    return True


# -- drawing ---------------------------------------------------------------------------------------


def draw(spec: PlotSpec, series: Sequence[Series], index: int) -> str:
    """The plot as an SVG element (text kept as text, ids unique to this plot)."""
    revisions = list(dict.fromkeys(s.revision for s in series))
    keys = list(dict.fromkeys((s.file, s.y_field) for s in series))
    files = {s.file for s in series}
    fields = {s.y_field for s in series}
    styles = ["-", "--", ":", "-."]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"lightclip-plot-{index}", "font.size": 9}):
        fig = Figure(figsize=(6.4, 3.8))
        ax = fig.add_subplot()
        for s in series:
            colour = f"C{keys.index((s.file, s.y_field)) % 10}"
            parts = []
            if len(files) > 1:
                parts.append(PurePosixPath(s.file).stem)
            if len(fields) > 1 or not parts:
                parts.append(s.y_field)
            if len(revisions) > 1:
                parts.append(f"@ {s.revision}")
            label = " ".join(parts)
            style = styles[revisions.index(s.revision) % len(styles)]
            if spec.template == "scatter":
                marker = "os^Dv"[revisions.index(s.revision) % 5]
                ax.scatter(s.xs, s.ys, color=colour, marker=marker, label=label)
                for x, y, text in zip(s.xs, s.ys, s.labels):
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            else:
                ax.plot(s.xs, s.ys, style, color=colour, marker="o", markersize=3, label=label)
        ax.set_xlabel(spec.x_label or series[0].x_field)
        ax.set_ylabel(spec.y_label or ", ".join(sorted(fields)))
        ax.set_title(spec.title or spec.id)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # no XML prolog or DOCTYPE inside HTML


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
section {{ margin-bottom: 2em; }}
svg {{ max-width: 100%; height: auto; }}
.source {{ color: #555; font-size: 0.9em; }}
.missing {{ color: #a40000; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="source">{subtitle}</p>
{missing}
{sections}
</body>
</html>
"""


def render(project: Path, revisions: Sequence[str] = (), *, dvc_file: str = DVC_FILE, out: Path | str | None = None) -> PlotsReport:
    """Draw every plot of ``project/dvc_file`` (workspace first, then each of ``revisions``) into ``out``.

    A plot with no data in any of them is an error; data missing in some is listed on the page
    and in the report.
    """
    project = Path(project)
    specs = read_specs(project / dvc_file)
    trees = [Tree(project)] + [Tree(project, rev) for rev in revisions]
    out = Path(out) if out is not None else project / DEFAULT_OUT
    report = PlotsReport(out=out, revisions=[t.name for t in trees])
    sections = []
    for index, spec in enumerate(specs):
        series = [s for tree in trees for s in load_series(spec, tree, report)]
        if not series:
            raise PlotsError(f"plot {spec.id}: no data in {', '.join(t.name for t in trees)} (run the stage that writes {', '.join(spec.sources)})")
        report.plots[spec.id] = len(series)
        files = list(dict.fromkeys((s.revision, s.file) for s in series))
        source = ", ".join(f"{html.escape(f)} ({html.escape(r)}, {report.rows[(r, f)]} rows)" for r, f in files)
        sections.append(f'<section id="plot-{index}">\n<h2>{html.escape(spec.title or spec.id)}</h2>\n<p class="source">{source}</p>\n{draw(spec, series, index)}\n</section>')
    missing = ""
    if report.missing:
        missing = '<ul class="missing">' + "".join(f"<li>{html.escape(m)}</li>" for m in report.missing) + "</ul>"
    page = PAGE.format(
        title=html.escape(f"DVC plots of {project.resolve().name}"),
        subtitle=html.escape(f"{dvc_file}: {len(specs)} plot(s); " + ("workspace" if not revisions else "compared: " + ", ".join(report.revisions))),
        missing=missing,
        sections="\n".join(sections),
    )
    atomic_write_bytes(out, page.encode("utf-8"))
    return report


def external_references(page: str) -> list[str]:
    """Anything in ``page`` a browser would fetch from elsewhere (scripts, stylesheets, images, imports)."""
    pattern = re.compile(r"""<script\b[^>]*\bsrc\s*=|<link\b[^>]*\bhref\s*=|\b(?:src|href|xlink:href)\s*=\s*["'](?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//""", re.IGNORECASE)
    return [m.group(0) for m in pattern.finditer(page)]
