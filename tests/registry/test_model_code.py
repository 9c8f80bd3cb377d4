"""The models-from-code file unpacks the package a model carries (one archive) where MLflow looks
for code, once and atomically, or privately when the model directory cannot be written."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import pytest

from lightclip.registry import model_code


def carried_package(tmp_path: Path) -> Path:
    """A logged model's ``code`` directory holding only ``lightclip.zip`` (a two-module package)."""
    code_dir = tmp_path / "model" / "code"
    code_dir.mkdir(parents=True)
    with zipfile.ZipFile(code_dir / model_code.ARCHIVE_NAME, "w") as archive:
        archive.writestr("lightclip/__init__.py", "SHIPPED = True\n")
        archive.writestr("lightclip/models/configs/arch.json", "{}\n")
    return code_dir


def test_the_archive_is_unpacked_beside_itself_once(tmp_path: Path):
    code_dir = carried_package(tmp_path)
    assert model_code.unpack_package(code_dir) == code_dir
    assert (code_dir / "lightclip" / "__init__.py").read_text() == "SHIPPED = True\n"
    assert (code_dir / "lightclip" / "models" / "configs" / "arch.json").is_file()  # configs are files, as zoo reads them
    assert sorted(p.name for p in code_dir.iterdir()) == ["lightclip", "lightclip.zip"]  # no staging left
    (code_dir / "lightclip" / "__init__.py").write_text("SHIPPED = 'kept'\n")
    assert model_code.unpack_package(code_dir) == code_dir
    assert (code_dir / "lightclip" / "__init__.py").read_text() == "SHIPPED = 'kept'\n"  # a complete package is not unpacked again


def test_a_loader_that_loses_the_race_uses_the_winners_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    code_dir = carried_package(tmp_path)
    rename = os.rename
    calls: list[str] = []

    def another_loader_renames_first(source: str, target: str) -> None:
        calls.append(str(target))
        Path(target).mkdir()  # another loader's complete package lands between our check and our rename
        (Path(target) / "__init__.py").write_text("SHIPPED = 'winner'\n")
        rename(source, target)  # ours meets a non-empty directory: OSError

    monkeypatch.setattr(model_code.os, "rename", another_loader_renames_first)
    assert model_code.unpack_package(code_dir) == code_dir
    assert calls == [str(code_dir / "lightclip")]
    assert (code_dir / "lightclip" / "__init__.py").read_text() == "SHIPPED = 'winner'\n"
    assert sorted(p.name for p in code_dir.iterdir()) == ["lightclip", "lightclip.zip"]  # our staging is gone


def test_a_failed_rename_without_a_winner_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    code_dir = carried_package(tmp_path)

    def broken(source: str, target: str) -> None:
        raise OSError(5, "Input/output error", str(target))

    monkeypatch.setattr(model_code.os, "rename", broken)
    with pytest.raises(OSError, match="Input/output error"):
        model_code.unpack_package(code_dir)
    assert sorted(p.name for p in code_dir.iterdir()) == ["lightclip.zip"]


def test_a_read_only_model_directory_gets_a_private_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    code_dir = carried_package(tmp_path)
    mkdtemp = tempfile.mkdtemp

    def read_only(*args, **kwargs) -> str:
        if kwargs.get("dir") == code_dir:
            raise PermissionError(13, "Read-only file system", str(code_dir))
        return mkdtemp(*args, **kwargs)

    monkeypatch.setattr(model_code.tempfile, "mkdtemp", read_only)
    private = model_code.unpack_package(code_dir)
    assert private != code_dir and (private / "lightclip" / "__init__.py").read_text() == "SHIPPED = True\n"
    assert sorted(p.name for p in code_dir.iterdir()) == ["lightclip.zip"]


def test_a_model_without_its_archive_is_named(tmp_path: Path):
    code_dir = tmp_path / "model" / "code"
    code_dir.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"{code_dir / 'lightclip.zip'}: the lightclip package archive of this model is missing"):
        model_code.unpack_package(code_dir)
