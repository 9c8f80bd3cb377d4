"""Small shared I/O: JSON outputs, atomic files and directories, torch/FAISS thread counts.

Every stage writes its outputs through these helpers so that a kill never leaves half a file or
half a directory behind (DVC would otherwise cache a broken output) and every JSON output has
one format (sorted keys, two-space indent, trailing newline: stable diffs in git).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def write_json(path: Path | str, payload: Any, *, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``payload`` as JSON atomically (parents created); returns the path."""
    path = Path(path)
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to a per-process temporary sibling, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers never share a temp file
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_dir(out_dir: Path | str) -> Iterator[Path]:
    """Build a directory output in a hidden sibling, then swap it in for ``out_dir``.

    Yields the (fresh, empty) staging directory. On success the old ``out_dir`` is removed and
    the staging directory renamed to it; on any exception the staging directory is removed and
    ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.is_dir() and not out_dir.is_symlink():
        shutil.rmtree(out_dir)
    elif out_dir.exists() or out_dir.is_symlink():
        out_dir.unlink()
    os.replace(tmp, out_dir)


def default_threads() -> int:
    """Threads when a config says ``null``: the cores of the machine."""
    return os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int | None, *, faiss_too: bool = False) -> Iterator[int]:
    """Run a block on ``threads`` torch threads (``None`` = :func:`default_threads`), then restore.

    ``faiss_too`` sets FAISS's OpenMP threads the same way. Yields the thread count in force.
    """
    # Imported here, not at the top: this module is also the CLI's, and torch is about 1.1 s of
    # the 1.2 s `import lightclip.cli` takes; FAISS is needed only where it is asked for.
    import torch

    count = threads or default_threads()
    previous = torch.get_num_threads()
    previous_faiss = None
    if faiss_too:
        import faiss

        previous_faiss = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(count)
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
        if previous_faiss is not None:
            import faiss

            faiss.omp_set_num_threads(previous_faiss)
