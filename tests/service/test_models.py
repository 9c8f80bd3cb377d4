"""What to serve: references parsed, aliases resolved (production falls back to staging with a
warning), registered versions downloaded once and refused when their weights do not match."""

from __future__ import annotations

import logging
import shutil

import pytest

from lightclip.models.zoo import weights_sha256
from lightclip.registry.aliases import TAG_WEIGHTS
from lightclip.service import ModelRef, ModelRefError, ModelResolver

from .conftest import STUDENT


def test_references_parse_as_directories_aliases_or_versions(svc_assets):
    local = ModelRef.parse("models/a", svc_assets)
    assert local.path == (svc_assets / "models" / "a").resolve() and not local.watched
    alias = ModelRef.parse("lightclip-student@production", svc_assets)
    assert (alias.name, alias.alias, alias.watched) == ("lightclip-student", "production", True)
    version = ModelRef.parse("models:/lightclip-student/2", svc_assets)
    assert (version.name, version.version, version.watched) == ("lightclip-student", "2", False)
    with pytest.raises(ModelRefError, match="NAME@ALIAS"):
        ModelRef.parse("models/nothing-here", svc_assets)


def resolver(project, text: str) -> ModelResolver:
    return ModelResolver(ModelRef.parse(text, project.root), project.root / ".cache" / "models", project.registry())


def test_production_falls_back_to_staging_with_a_warning_until_it_is_set(serve_project, caplog):
    project = serve_project
    with pytest.raises(ModelRefError, match=r"@production is not set and neither is @staging"):
        resolver(project, f"{STUDENT}@production").current_version()
    project.set_alias("staging", "2")
    with caplog.at_level(logging.WARNING, logger="lightclip.service.models"):
        assert resolver(project, f"{STUDENT}@production").current_version() == ("2", "staging")
    assert "@production is not set; serving @staging (v2)" in caplog.text
    project.set_alias("production", "1")
    assert resolver(project, f"{STUDENT}@production").current_version() == ("1", "production")
    with pytest.raises(ModelRefError, match="alias @canary is not set"):
        resolver(project, f"{STUDENT}@canary").current_version()


def test_a_registered_version_is_downloaded_once_with_verified_weights(serve_project, svc_assets):
    project = serve_project
    project.set_alias("production", "2")
    first = resolver(project, f"{STUDENT}@production").resolve()
    assert first.version == "2" and first.alias == "production" and first.label == f"{STUDENT} v2 (@production)"
    assert weights_sha256(first.model_dir) == weights_sha256(svc_assets / "models" / "b") == first.weights_sha256
    stamp = (first.model_dir / "model.safetensors").stat().st_mtime_ns
    again = resolver(project, f"{STUDENT}/2").resolve()
    assert again.model_dir == first.model_dir and (again.model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_weights_that_do_not_match_the_versions_sha_are_refused(serve_project, svc_assets):
    project = serve_project
    project.registry().client.set_model_version_tag(STUDENT, "1", TAG_WEIGHTS, weights_sha256(svc_assets / "models" / "b"))
    with pytest.raises(ModelRefError, match="refusing to serve them"):
        resolver(project, f"{STUDENT}/1").resolve()
    assert not (project.root / ".cache" / "models" / STUDENT / "v1").exists()
    with pytest.raises(ModelRefError, match="no version 9"):
        resolver(project, f"{STUDENT}/9").resolve()
