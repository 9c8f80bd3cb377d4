"""benchmarks/scaling.py at a tiny size: every stage runs, each with its time and peak memory in the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, load_script


def test_tiny_run_writes_every_stage(tmp_path: Path, shared_mlflow_uri: str):
    """In its own interpreter: ``--fork`` must fork from a process that has run no torch op (this one has)."""
    out = tmp_path / "scaling.json"
    argv = [sys.executable, str(REPO_ROOT / "benchmarks" / "scaling.py"), "--sizes", "20", "--sources", "stream", "--workdir", str(tmp_path / "work"),
            "--out", str(out), "--keep", "--fork"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": shared_mlflow_uri, "LIGHTCLIP_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "work" / "n20" / "stages.log").read_text()
    assert "| teacher_embed[stream] |" in done.stdout  # the markdown table
    result = json.loads(out.read_text())
    assert result["fork"] is True and result["teacher"] == "lc-vit-xxt" and result["machine"]["cpus"] >= 1
    stages = result["sizes"]["20"]
    assert list(stages) == ["synth", "export_webdataset", "import_webdataset", "validate", "split", "teacher_embed[stream]", "index[stream]"]
    assert all(row["seconds"] > 0 and row["peak_rss_mib"] > 0 for row in stages.values())
    project = tmp_path / "work" / "n20"
    embedded = json.loads((project / "metrics" / "teacher_embed-stream.json").read_text())
    indexed = json.loads((project / "metrics" / "index-stream.json").read_text())
    assert indexed["index/count"] == 20 and 0 < embedded["train_items"] < 20  # every item indexed, the train split embedded


def test_sizes_and_sources_are_checked():
    script = load_script("benchmarks/scaling.py", "scaling")
    with pytest.raises(SystemExit, match="at least 10"):
        script.parse_sizes("5")
    with pytest.raises(SystemExit, match="unknown"):
        script.parse_sources("cache,disk")
