"""Teacher training throughput on this machine: 1 process vs N data-parallel ranks (train.nproc).

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/ddp_cpu.py [--items 352] [--arch lc-vit-t] [--nproc 1 2]

Builds a synthetic split catalogue and its knowledge graph in a temporary directory, then runs
``lightclip pretrain`` (concept term on, one ensemble member, global batch 64, 2 epochs) once
per process count, each in its own project, and prints the pairs/s the stage reports (training
steps only; image decoding and validation excluded) and the command's wall time. The same global
batch and seed: the runs train the same teacher (docs/distributed.md), so only speed differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lightclip.config import KGConfig, SplitConfig, SynthConfig
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.kg.build import build_knowledge_graph

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=352, help="catalogue size (32 go to val/test)")
    parser.add_argument("--arch", default="lc-vit-t")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightclip-ddp-") as tmp:
        root = Path(tmp)
        raw = generate_catalogue(root / "raw", SynthConfig(seed=0, n_items=args.items), progress=False)
        split = assign_splits(raw, SplitConfig(seed=0, val=16, test=16)).save(root / "split")
        build_knowledge_graph(split, KGConfig(min_count=2), root / "kg", stats_path=root / "kg.json", figure_path=root / "kg.png", progress=False)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        rows = []
        for nproc in args.nproc:
            project = root / f"nproc{nproc}"
            project.mkdir()
            params["pretrain"]["model"]["arch"] = args.arch
            params["pretrain"]["train"].update(epochs=args.epochs, batch_size=args.batch, nproc=nproc, early_stop_patience=0)
            params["pretrain"]["ensemble_members"] = 1
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            command = [sys.executable, "-m", "lightclip", "--project", str(project), "-q", "pretrain", "--in", str(root / "split"),
                       "--kg", str(root / "kg"), "--out", str(project / "teacher"), "--metrics", str(project / "pretrain.json")]
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=project, capture_output=True, text=True)
            wall = time.perf_counter() - started
            metrics = json.loads((project / "pretrain.json").read_text())
            rows.append((nproc, metrics["steps"], metrics["train_pairs_per_s"], metrics["train_seconds"], wall, metrics["val/best_mean_recall"]))
    print(f"{args.arch}, {args.items - 32} training pairs, global batch {args.batch}, {args.epochs} epochs, concept term on")
    print("| ranks | steps | train pairs/s | train s | command wall s | val mean recall |")
    print("|---|---|---|---|---|---|")
    for nproc, steps, rate, seconds, wall, recall in rows:
        print(f"| {nproc} | {steps} | {rate:.1f} | {seconds:.1f} | {wall:.1f} | {recall:.4f} |")


if __name__ == "__main__":
    main()
