"""The whole pipeline, at test size, against the team deployment (issue #13): the stages log to the
MLflow server (PostgreSQL behind it, artifacts proxied to the S3 bucket) through
``MLFLOW_TRACKING_URI`` alone. What it left is checked where it lives, not through MLflow: the
runs, params and metrics as rows of PostgreSQL, the artifacts as objects of the bucket (boto3,
the weights bit for bit), the registered versions and ``@staging`` as rows too; then a fresh
process that knows only the tracking URI loads ``models:/lightclip-student@staging`` and embeds
what the local weights embed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import psycopg
import pytest
import yaml

from lightclip.cli import main
from lightclip.data.catalogue import Catalogue
from lightclip.env import TELEMETRY_OFF
from lightclip.serving import Embedder

pytestmark = [pytest.mark.team, pytest.mark.slow]

STAGES = {"validate", "split", "build_kg", "pretrain", "teacher_embed", "distill", "evaluate", "index", "register"}

#: Run in a fresh process whose environment holds the tracking URI and nothing about S3 or the database.
LOAD_AND_PREDICT = """
import json, sys
import mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model("models:/lightclip-student@staging")
frame = pd.DataFrame(json.loads(open(sys.argv[1]).read()))
np.save(sys.argv[2], model.predict(frame))
"""


def _objects(client, bucket: str) -> dict[str, int]:
    """Every object of the bucket: key -> size."""
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def test_the_tiny_pipeline_lands_in_postgresql_the_bucket_and_the_registry(team_services, projects, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    team = team_services.env()
    uri = team["MLFLOW_TRACKING_URI"]
    experiment = f"team-pipeline-{uuid.uuid4().hex[:8]}"  # the server is shared by the session's tests
    params = projects.tiny_params()
    params["tracking"]["experiment"] = experiment
    # Staging is what this test loads: the gate must not refuse a one-epoch student because of
    # another test's holder of @staging on the shared server (the gate has its own tests).
    params["promote"].update(max_regression=100.0, max_encode_ms=1000.0)
    root = projects.create(tmp_path / "proj", params, real_pipeline=True, dvc=True)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for key in [k for k in os.environ if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"]:
        monkeypatch.delenv(key)  # the client needs no S3 credentials: the server proxies artifacts
    projects.enter(root, monkeypatch, mlflow_uri=uri)
    projects.track_synthetic_data(root)

    assert main(["-q", "pipeline", "--name", "team-tiny"]) == 0
    assert not (root / "mlflow").exists()  # nothing went to a local store
    report = json.loads((root / "metrics" / "register.json").read_text())
    student = next(iter(params["distill"]["students"]))
    staged = report["students"][student]
    assert staged["staged"] and report["staging_after"] == staged["version"]
    weights = (root / "models" / "students" / student / "model.safetensors").read_bytes()

    # PostgreSQL: the experiment, every stage's run FINISHED under the pipeline's (and the data
    # synth run before it), their params and metrics.
    with psycopg.connect(team_services.postgres_dsn("mlflow")) as db:
        experiment_id, artifact_location = db.execute("SELECT experiment_id, artifact_location FROM experiments WHERE name = %s",
                                                      (experiment,)).fetchone()
        runs = db.execute(
            "SELECT r.run_uuid, r.status, s.value, p.value FROM runs r"
            " JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'lightclip.stage'"
            " LEFT JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'mlflow.parentRunId' WHERE r.experiment_id = %s",
            (experiment_id,)).fetchall()
        by_stage = {stage: (run_id, status, parent) for run_id, status, stage, parent in runs}
        param_counts = dict(db.execute("SELECT run_uuid, count(*) FROM params WHERE run_uuid = ANY(%s) GROUP BY run_uuid",
                                       ([r[0] for r in runs],)).fetchall())
        metric_keys = db.execute("SELECT DISTINCT run_uuid, key FROM metrics WHERE run_uuid = ANY(%s)", ([r[0] for r in runs],)).fetchall()
        versions = db.execute("SELECT name, version, run_id, source FROM model_versions WHERE name IN ('lightclip-student', 'lightclip-teacher')"
                              " AND current_stage <> 'Deleted_Internal'").fetchall()
        staging = db.execute("SELECT version FROM registered_model_aliases WHERE name = 'lightclip-student' AND alias = 'staging'").fetchone()
        version_tags = dict(db.execute("SELECT key, value FROM model_version_tags WHERE name = 'lightclip-student' AND version = %s",
                                       (int(staged["version"]),)).fetchall())
        audit = [json.loads(value) for (value,) in db.execute(
            "SELECT t.value FROM model_version_tags t WHERE t.name = 'lightclip-registry-audit' AND t.key = 'lightclip.audit.record'").fetchall()]
    assert artifact_location.startswith("mlflow-artifacts:/")  # proxied: clients never see the bucket
    assert sorted(stage for _, _, stage, _ in runs) == sorted(STAGES | {"pipeline", "synth"})
    assert {status for _, status, _ in by_stage.values()} == {"FINISHED"}
    pipeline_run = by_stage["pipeline"][0]
    assert {stage for stage, (_, _, parent) in by_stage.items() if parent == pipeline_run} == STAGES
    assert all(param_counts.get(by_stage[stage][0], 0) > 0 for stage in STAGES | {"pipeline"})
    keys = {(run_id, key) for run_id, key in metric_keys}
    assert any(run == by_stage["evaluate"][0] and "mean_recall" in key for run, key in keys)
    assert any(run == by_stage["distill"][0] for run, _ in keys)

    # The registry, in the same database: both models registered, @staging at the staged version,
    # whose weights tag is the local student's, and the move in the audit log.
    assert {name for name, *_ in versions} == {"lightclip-student", "lightclip-teacher"}
    assert staging == (int(staged["version"]),)
    assert version_tags["lightclip.weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert any(r["model"] == "lightclip-student" and r["alias"] == "staging" and r["to"] == staged["version"] for r in audit)

    # The bucket, listed with boto3: every stage's artifacts and the registered model, weights bit for bit.
    s3 = boto3.client("s3", endpoint_url=team["AWS_ENDPOINT_URL"], aws_access_key_id=team["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=team["AWS_SECRET_ACCESS_KEY"], region_name=team.get("AWS_DEFAULT_REGION", "us-east-1"))
    bucket = team["LIGHTCLIP_S3_MLFLOW_BUCKET"]
    objects = _objects(s3, bucket)
    for stage in ("evaluate", "register"):
        assert any(f"{experiment_id}/{by_stage[stage][0]}/artifacts/" in key for key in objects), f"no artifacts of {stage} in s3://{bucket}"
    distilled = f"{experiment_id}/{by_stage['distill'][0]}/artifacts/student/model.safetensors"
    assert objects.get(distilled) == len(weights), f"{distilled} not in s3://{bucket}"
    source = next(src for name, version, _, src in versions if name == "lightclip-student" and str(version) == staged["version"])
    model_id = source.rstrip("/").split("/")[-1]  # models:/m-... (MLflow 3 logged models)
    model_keys = [key for key in objects if f"/models/{model_id}/artifacts/" in key]
    assert any(key.endswith("/MLmodel") for key in model_keys), model_keys
    weights_key = next(key for key in model_keys if key.endswith("model.safetensors"))
    assert s3.get_object(Bucket=bucket, Key=weights_key)["Body"].read() == weights

    # A fresh process that knows only the tracking URI loads @staging and embeds as the local weights do.
    catalogue = Catalogue.load(root / "data" / "split")
    items = catalogue.split("test").head(3)
    images = [base64.b64encode(catalogue.image_path(p).read_bytes()).decode() for p in items["image"]]
    request = {"text": list(items["title"]) + [None] * 3, "image": [None] * 3 + images}
    (tmp_path / "request.json").write_text(json.dumps(request))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(fresh), **TELEMETRY_OFF, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, str(tmp_path / "request.json"), str(tmp_path / "out.npy")],
                            cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "out.npy")
    local = Embedder(root / "models" / "students" / student).embed_frame(pd.DataFrame(request))
    assert served.shape == local.shape == (6, local.shape[1]) and served.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(served, local, atol=1e-5)
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]  # the pipeline ran under DVC
