"""Writing a file (or a folder) so that a reader never sees half of it: a temporary one beside
it, renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the file at a temporary path beside `path`, which then replaces `path`
    whole; on an error, or an interrupt, `path` is left as it was and the temporary file removed.
    The temporary name ends in `path`'s suffix, for writers that choose the format by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """`dst` made the same file as `src` (a hard link) where the file system allows, else a copy
    of it. For weights that no writer here ever changes in place (each replaces its file whole),
    so sharing them is safe: a 385 MB Mimi, or a model's weights, then costs nothing to place in
    another folder of the same disk."""
    dst = Path(dst)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)
    return dst


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_file_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


@contextmanager
def folder_atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary one beside `path` (the block gets its path) and put it in
    place whole when the block ends, replacing what was at `path`; on an error, or an interrupt,
    `path` is left as it was and the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
