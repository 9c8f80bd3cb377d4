"""lightclip.plots and `lightclip plots`: the DVC plots of dvc.yaml drawn offline, as inline SVG.

Each test writes its own small project (dvc.yaml with the repository's two kinds of plot, CSV data
as the evaluate stage writes it, a git commit for the revision comparisons). The page is loaded
in a real headless Chromium that can reach nothing (its proxy is a closed port on 127.0.0.1):
the plot must show there, where ``dvc plots show``'s page, which loads Vega from a CDN, is blank.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightclip.cli import main as cli_main
from lightclip.plots import PlotsError, external_references, read_specs, render

DVC_YAML = """\
stages: {}
plots:
  - metrics/plots/eval/recall_at_k:
      template: linear
      x: k
      y: [i2t_recall, t2i_recall]
      x_label: k
      y_label: recall@k (%)
      title: recall@k on the test split
  - metrics/plots/eval/recall_vs_latency.csv:
      template: scatter
      x: encode_ms_per_item
      y: mean_recall
      title: recall vs encode latency
"""

CURVES = {
    "teacher": "k,i2t_recall,t2i_recall\n1,47.0,48.6\n5,90.0,90.3\n10,96.3,97.6\n",
    "xt": "k,i2t_recall,t2i_recall\n1,40.0,41.0\n5,80.0,82.5\n10,91.0,92.0\n",
}
SCATTER = "model,encode_ms_per_item,mean_recall\nteacher,3.30,86.7\nxt,0.52,78.3\n"

#: A page drawn the way `dvc plots show` draws one: Vega from a CDN.
CDN_PAGE = """<!DOCTYPE html><html><head>
<script src="https://cdn.jsdelivr.net/npm/vega@5.20.2"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-lite@5.2.0"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-embed@6.18.2"></script>
</head><body><div id="plot"></div>
<script>vegaEmbed("#plot", {"data": {"values": [{"k": 1, "r": 40}, {"k": 5, "r": 80}]}, "mark": "line",
"encoding": {"x": {"field": "k", "type": "quantitative"}, "y": {"field": "r", "type": "quantitative"}}});</script>
</body></html>
"""


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def plot_project(tmp_path: Path) -> Path:
    """A project with the two plots and their data, committed in git."""
    root = tmp_path / "proj"
    (root / "metrics" / "plots" / "eval" / "recall_at_k").mkdir(parents=True)
    (root / "dvc.yaml").write_text(DVC_YAML)
    for name, text in CURVES.items():
        (root / "metrics" / "plots" / "eval" / "recall_at_k" / f"{name}.csv").write_text(text)
    (root / "metrics" / "plots" / "eval" / "recall_vs_latency.csv").write_text(SCATTER)
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "lightclip test")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "plot data")
    return root


def test_the_page_is_self_contained_with_one_inline_svg_per_plot(plot_project: Path):
    report = render(plot_project, out=plot_project / "plots.html")
    page = (plot_project / "plots.html").read_text()
    assert page.count("<svg") == 2 and "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert external_references(page) == []
    assert external_references(CDN_PAGE)  # the check finds what dvc's page would fetch
    assert report.plots == {"metrics/plots/eval/recall_at_k": 4, "metrics/plots/eval/recall_vs_latency.csv": 1}  # 2 files x 2 fields; 1
    assert report.rows == {
        ("workspace", "metrics/plots/eval/recall_at_k/teacher.csv"): 3,
        ("workspace", "metrics/plots/eval/recall_at_k/xt.csv"): 3,
        ("workspace", "metrics/plots/eval/recall_vs_latency.csv"): 2,
    }
    assert report.missing == []
    assert "recall@k on the test split" in page and ">teacher<" in page  # text stays text; scatter points labelled


def test_a_revision_is_drawn_beside_the_workspace_and_what_it_lacks_is_listed(plot_project: Path):
    curve = plot_project / "metrics" / "plots" / "eval" / "recall_at_k" / "xt.csv"
    curve.write_text(CURVES["xt"] + "20,95.0,96.0\n")  # the workspace has one more row than HEAD
    (plot_project / "metrics" / "loss.csv").write_text("step,loss\n0,2.0\n1,1.5\n")
    with (plot_project / "dvc.yaml").open("a") as f:
        f.write("  - metrics/loss.csv\n")  # only in the workspace; y: the last column, x: the row

    report = render(plot_project, ["HEAD"], out=plot_project / "diff.html")
    page = (plot_project / "diff.html").read_text()
    assert report.revisions == ["workspace", "HEAD"]
    assert report.rows[("workspace", "metrics/plots/eval/recall_at_k/xt.csv")] == 4
    assert report.rows[("HEAD", "metrics/plots/eval/recall_at_k/xt.csv")] == 3
    assert report.plots["metrics/plots/eval/recall_at_k"] == 8 and report.plots["metrics/loss.csv"] == 1
    assert report.missing == ["metrics/loss.csv is not in HEAD"]
    assert "metrics/loss.csv is not in HEAD" in page and "@ HEAD" in page and "@ workspace" in page
    assert page.count("<svg") == 3


def test_a_project_below_the_git_root_reads_revisions_relative_to_itself(tmp_path: Path, plot_project: Path):
    outer = tmp_path / "outer"
    shutil.copytree(plot_project, outer / "sub" / "proj", ignore=shutil.ignore_patterns(".git"))
    git(outer, "init", "-q")
    git(outer, "add", "-A")
    git(outer, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "nested")
    report = render(outer / "sub" / "proj", ["HEAD"], out=tmp_path / "nested.html")
    assert report.rows[("HEAD", "metrics/plots/eval/recall_at_k/teacher.csv")] == 3 and report.missing == []


@pytest.mark.parametrize(
    ("path", "text", "message"),
    [
        ("metrics/plots/eval/recall_at_k/xt.csv", "k,i2t_recall,t2i_recall\n1,40,41\n5,n/a,82\n",
         r"recall_at_k/xt.csv \(workspace\): line 3, field 'i2t_recall': 'n/a' is not a number"),
        ("metrics/plots/eval/recall_at_k/xt.csv", 'k,i2t_recall,t2i_recall\n1,40,"41\n5,80,82\n', r"xt.csv \(workspace\): line \d+: .*(unexpected end|EOF)"),
        ("metrics/plots/eval/recall_at_k/xt.csv", "k,i2t_recall,t2i_recall\n1,40\n", r"xt.csv \(workspace\): line 2: 2 fields, the header has 3"),
        ("metrics/plots/eval/recall_at_k/xt.csv", "k,i2t,t2i\n1,40,41\n", r"xt.csv \(workspace\): no field 'i2t_recall'"),
        ("metrics/plots/eval/recall_at_k/xt.csv", "k,i2t_recall,t2i_recall\n", r"xt.csv \(workspace\): no rows"),
        ("metrics/plots/eval/recall_vs_latency.csv", "model,encode_ms_per_item,mean_recall\nxt,0.5,inf\n", r"line 2, field 'mean_recall': 'inf' is not a finite number"),
        ("dvc.yaml", DVC_YAML.replace("template: scatter", "template: confusion"), r"template 'confusion' cannot be drawn offline"),
        ("dvc.yaml", DVC_YAML.replace("title: recall vs", "colour: red\n      title: recall vs"), r"unknown properties \['colour'\]"),
        ("dvc.yaml", "stages: {}\n", r"no top-level `plots:` section"),
    ],
    ids=["not-a-number", "unclosed-quote", "short-row", "missing-field", "no-rows", "not-finite", "template", "unknown-property", "no-plots"],
)
def test_bad_data_or_definitions_are_errors_naming_the_file_line_and_field(plot_project: Path, path: str, text: str, message: str):
    (plot_project / path).write_text(text)
    with pytest.raises(PlotsError, match=message):
        render(plot_project, out=plot_project / "plots.html")
    assert not (plot_project / "plots.html").exists()


def test_a_plot_without_data_anywhere_or_an_unknown_revision_is_an_error(plot_project: Path):
    with pytest.raises(PlotsError, match="revision 'no-such-rev': not a commit"):
        render(plot_project, ["no-such-rev"])
    shutil.rmtree(plot_project / "metrics" / "plots" / "eval" / "recall_at_k")
    with pytest.raises(PlotsError, match="plot metrics/plots/eval/recall_at_k: no data in workspace"):
        render(plot_project)


def test_the_forms_of_dvc_plot_definitions(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(
        "plots:\n  - a.csv\n  - cmp:\n      x: {a.csv: step, b.json: epoch}\n      y: {a.csv: loss, b.json: [acc, f1]}\n      template: simple\n"
    )
    plain, by_id = read_specs(tmp_path / "dvc.yaml")
    assert (plain.id, plain.sources, plain.x, plain.template) == ("a.csv", {"a.csv": ()}, {"a.csv": None}, "linear")
    assert by_id.sources == {"a.csv": ("loss",), "b.json": ("acc", "f1")} and by_id.x == {"a.csv": "step", "b.json": "epoch"}
    (tmp_path / "a.csv").write_text("step,loss\n0,1.0\n1,0.5\n")
    (tmp_path / "b.json").write_text('[{"epoch": 0, "acc": 0.5, "f1": 0.4}, {"epoch": 1, "acc": 0.7, "f1": 0.6}]')
    report = render(tmp_path, out=tmp_path / "p.html")
    assert report.plots == {"a.csv": 1, "cmp": 3}


def test_lightclip_plots_writes_the_page_and_reports_errors_in_one_line(plot_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.chdir(plot_project)
    assert cli_main(["plots", "--out", "out/plots.html"]) == 0
    assert "2 plot(s), 5 series, 8 rows from 3 file(s) (workspace)" in capsys.readouterr().out
    assert (plot_project / "out" / "plots.html").read_text().count("<svg") == 2
    assert cli_main(["plots", "--rev", "nope"]) == 1
    err = capsys.readouterr().err
    assert "revision 'nope': not a commit" in err and "Traceback" not in err


# -- in a real browser, with no network --------------------------------------------------------------


def chromium_or_skip() -> str:
    """The Chromium binary; a skip that says why when it is absent and cannot be installed here."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be installed here (`make install` installs it with apt-get, which needs root on Debian)")
    pytest.fail("chromium is not installed: run `make install` (it runs `apt-get install -y chromium` as root)")


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium whose every network request goes to a closed port (it is offline)."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--proxy-server=127.0.0.1:9",
               "--proxy-bypass-list=<-loopback>", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def drawn_pixels(png: Path) -> tuple[int, int]:
    """(dark pixels: text, axes and lines; coloured pixels: the data series) of a screenshot."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    dark = int((rgb.min(axis=2) < 160).sum())
    coloured = int((rgb.max(axis=2) - rgb.min(axis=2) > 80).sum())
    return dark, coloured


def test_headless_chromium_without_network_shows_the_plots(plot_project: Path, tmp_path: Path):
    binary = chromium_or_skip()
    render(plot_project, out=tmp_path / "plots.html")
    page = (tmp_path / "plots.html").read_text()
    (tmp_path / "text.html").write_text(re.sub(r"<svg\b.*?</svg>", "", page, flags=re.DOTALL))  # the same page, plots left out
    (tmp_path / "cdn.html").write_text(CDN_PAGE)

    shots = {}
    for name in ("plots", "text", "cdn"):
        png = tmp_path / f"{name}.png"
        result = chromium(binary, tmp_path / f"profile-{name}", f"--screenshot={png}", "--window-size=900,1300", (tmp_path / f"{name}.html").as_uri())
        assert png.is_file(), f"chromium wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}"
        shots[name] = drawn_pixels(png)
    (dark, coloured), (text_dark, text_coloured) = shots["plots"], shots["text"]
    assert dark - text_dark > 5000, f"no axes or labels drawn: {dark} dark pixels, {text_dark} without the plots"
    assert coloured > 1500 and text_coloured == 0, f"no data series drawn: {coloured} coloured pixels"
    assert shots["cdn"] == (0, 0)  # the same check on a page that needs a CDN: blank offline

    dom = chromium(binary, tmp_path / "profile-dom", "--dump-dom", (tmp_path / "plots.html").as_uri()).stdout
    assert len(re.findall(r"<svg\b", dom)) == 2 and "recall@k on the test split" in dom and "<path" in dom
