"""The distillation ablation table from per-run metrics files (``[<student>/]<variant>-seed<n>.json``).

Used by ``pipelines/ablation/dvc.yaml`` (stage ``table``) and by ``ablation_distill.py``: mean ±
std over seeds of the test recall of every edge-set variant, the paired gain over the student
trained alone (same seed), the teacher's own numbers beside them, and the cost per epoch (median
over seeds).

    python benchmarks/ablation_table.py distill metrics/ablation/distill --teacher metrics/pretrain.json \
        --out metrics/ablation_distill_synthetic.json --label synthetic
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

RUN_FILE = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)\.json$")
BASELINE = "no_distill"


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def read_runs(directory: Path) -> list[dict[str, Any]]:
    """Every run file of ``directory`` as a row (student, variant, seed, metrics).

    Either ``<student>/<variant>-seed<n>.json`` (the DVC matrix) or flat
    ``<variant>-seed<n>.json`` (one student; its name is then empty).
    """
    runs = []
    for path in sorted([*Path(directory).glob("*.json"), *Path(directory).glob("*/*.json")]):
        match = RUN_FILE.match(path.name)
        if match is None:
            raise SystemExit(f"{path}: not a run file (<variant>-seed<n>.json)")
        metrics = json.loads(path.read_text(encoding="utf-8"))
        student = path.parent.name if path.parent != Path(directory) else ""
        runs.append({"student": student, "variant": match["variant"], "seed": int(match["seed"]), **metrics})
    if not runs:
        raise SystemExit(f"{directory}: no run files")
    return runs


def distill_table(runs: Sequence[Mapping[str, Any]], label: str, teacher: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rows per student and variant, and the Markdown table."""
    rows = []
    lines = [
        "| catalogue | student | variant | seeds | test mean recall | gain vs no distillation (paired) | % of teacher | test i2t R@1 | test t2i R@1 | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    teacher_recall = teacher.get("test/mean_recall") if teacher else None
    for student in dict.fromkeys(r.get("student", "") for r in runs):
        mine = [r for r in runs if r.get("student", "") == student]
        found = list(dict.fromkeys(r["variant"] for r in mine))
        # the student alone first, the full graph last, the single-kind variants between
        variants = [v for v in found if v == BASELINE] + [v for v in found if v not in (BASELINE, "full")] + [v for v in found if v == "full"]
        baseline = {r["seed"]: r["test/mean_recall"] for r in mine if r["variant"] == BASELINE}
        for variant in variants:
            sel = sorted((r for r in mine if r["variant"] == variant), key=lambda r: r["seed"])
            recall = [r["test/mean_recall"] for r in sel]
            gains = [r["test/mean_recall"] - baseline[r["seed"]] for r in sel if r["seed"] in baseline]
            per_epoch = [r["train_seconds"] / max(1, r["epochs_completed"]) for r in sel]
            row = {
                "student": student,
                "variant": variant,
                "seeds": [r["seed"] for r in sel],
                "test/mean_recall": statistics.mean(recall),
                "test/mean_recall_std": statistics.stdev(recall) if len(recall) > 1 else 0.0,
                "gain_vs_no_distill": statistics.mean(gains) if gains and variant != BASELINE else 0.0,
                # the median: robust to a seed whose run shared the cores with another job
                "seconds_per_epoch": statistics.median(per_epoch),
            }
            if teacher_recall:
                row["fraction_of_teacher"] = row["test/mean_recall"] / teacher_recall
            rows.append(row)
            gain = f"{mean_std(gains)}" if gains and variant != BASELINE else "–"
            share = f"{100 * row['fraction_of_teacher']:.1f}%" if teacher_recall else "–"
            lines.append(
                f"| {label} | {student or '–'} | {variant} | {len(sel)} | {mean_std(recall)} | {gain} | {share} | "
                f"{mean_std([r['test/i2t_R@1'] for r in sel])} | {mean_std([r['test/t2i_R@1'] for r in sel])} | {row['seconds_per_epoch']:.1f} |"
            )
    if teacher:
        lines.append(
            f"| {label} | teacher (for reference) | – | – | {teacher['test/mean_recall']:.1f} | – | 100% | "
            f"{teacher['test/i2t_R@1']:.1f} | {teacher['test/t2i_R@1']:.1f} | – |"
        )
    return {"label": label, "rows": rows, "runs": list(runs), "table": "\n".join(lines), **({"teacher": dict(teacher)} if teacher else {})}


def write_table(result: Mapping[str, Any], out: Path | str) -> None:
    """Write the table JSON and print the Markdown table."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(result["table"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["distill"])
    parser.add_argument("runs", help="directory of <variant>-seed<n>.json metrics files")
    parser.add_argument("--teacher", help="the teacher's metrics JSON (its test numbers go beside the students')")
    parser.add_argument("--label", default="synthetic")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    teacher = json.loads(Path(args.teacher).read_text(encoding="utf-8")) if args.teacher else None
    write_table(distill_table(read_runs(Path(args.runs)), args.label, teacher), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
