"""The code file of every registered lightclip model ("models from code"): MLflow executes it to
load a version; it makes the ``lightclip`` package the model carries importable, then sets the
pyfunc, :class:`lightclip.serving.LightclipPyfunc`.

The package travels as one archive, ``code/lightclip.zip``, not as a source tree: through a
tracking server that proxies artifacts every file of a logged model is one upload, and the tree
is about 90 files per registered model. On load the archive is unpacked once, atomically, beside
itself into ``code/lightclip``, in the directory MLflow has already put first on ``sys.path``, so
a fresh process runs the copy inside the model exactly as it ran a shipped tree. Unpacked rather
than imported from the zip: ``lightclip.models.zoo`` reads its architecture configs as files.
Where the model directory cannot be written, the package is unpacked into a private temporary
directory for the process instead. A process that has already imported ``lightclip`` (the
register stage validating what it logs, the serving app) keeps the package it has, as it did
with the tree.

Only the standard library may be imported at the top of this file: it runs before ``lightclip``
is importable.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "lightclip"
#: The package archive's file name in the logged model's code directory.
ARCHIVE_NAME = f"{PACKAGE}.zip"
#: MLflow's directory for ``code_paths`` inside a logged model (the one it puts on ``sys.path``).
CODE_DIR = "code"


def unpack_package(code_dir: Path) -> Path:
    """Unpack ``code_dir/lightclip.zip`` so that ``lightclip`` imports from the returned directory.

    Unpacked into ``code_dir`` itself: staged in a hidden directory there and renamed into place,
    so that loaders running at once in the same model directory never import a half-written
    package (the first rename wins, the others find it complete). A read-only ``code_dir`` gets
    a private temporary copy, removed when the process exits.
    """
    code_dir = Path(code_dir)
    target = code_dir / PACKAGE
    if (target / "__init__.py").is_file():
        return code_dir
    archive = code_dir / ARCHIVE_NAME
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: the lightclip package archive of this model is missing (a lightclip model "
                                f"carries its package as {CODE_DIR}/{ARCHIVE_NAME})")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=code_dir))
    except OSError:  # a read-only model directory
        private = Path(tempfile.mkdtemp(prefix="lightclip-model-code-"))
        atexit.register(shutil.rmtree, private, True)
        _extract(archive, private)
        return private
    try:
        _extract(archive, staging)
        try:
            os.rename(staging / PACKAGE, target)
        except OSError:
            if not (target / "__init__.py").is_file():  # not a concurrent loader's win: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return code_dir


def _extract(archive: Path, directory: Path) -> None:
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(directory)


def make_package_importable(code_file: Path) -> None:
    """Put the package shipped beside ``code_file`` first on ``sys.path`` unless ``lightclip`` is already imported."""
    if PACKAGE in sys.modules:
        return
    path = str(unpack_package(Path(code_file).resolve().parent / CODE_DIR))
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()  # the directory may have been listed before the package appeared in it


if __name__ != "lightclip.registry.model_code":  # executed by MLflow as the logged model's code file
    make_package_importable(Path(__file__))
    # imported here, not at the top: the package is importable only from this line on
    from mlflow.models import set_model

    from lightclip.serving import LightclipPyfunc

    set_model(LightclipPyfunc())
