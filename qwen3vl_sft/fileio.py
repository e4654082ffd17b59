"""Atomic file and directory writes: a reader sees the old content or the new, never half of one.

Every writer here follows the same pattern: write into a temporary sibling of the target (same
directory, hence same filesystem, so the final ``os.replace`` / ``os.rename`` is atomic), flush and
fsync it, then move it into place.  On any error the temporary is removed and the target is left as
it was.  Data shards, manifests and checkpoints all go through these helpers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


def _fsync_dir(path: str) -> None:
    """Persist a rename: the directory entry lives in the parent, not in the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open directories; the rename itself already happened
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """Remove a leftover temporary file or directory (missing is fine: it was never created)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=False)
    elif os.path.lexists(path):
        os.unlink(path)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _sibling(path: str, tag: str, make_dir: bool) -> str:
    """Create a uniquely named file or directory next to ``path`` and return its name.

    Unlike ``tempfile.mkstemp``/``mkdtemp`` (mode 0600/0700), it is created with the umask applied,
    so the published file or directory gets the same permissions a plain ``open``/``mkdir`` gives.
    Missing parent directories are created, as for any output path.
    """
    os.makedirs(_parent(path), exist_ok=True)
    for _ in range(100):
        name = os.path.join(_parent(path), f".{os.path.basename(path)}.{tag}.{secrets.token_hex(4)}")
        try:
            if make_dir:
                os.mkdir(name, 0o777)
            else:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue  # name collision: draw another suffix
    raise FileExistsError(f"could not create a temporary name next to {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path next to ``path``; on success it is fsynced and renamed onto ``path``.

    The caller writes the file (with any library: ``torch.save``, ``Dataset.to_json`` ...).  If the
    block raises, the temporary is deleted and ``path`` is untouched.
    """
    path = os.fspath(path)
    tmp = _sibling(path, "tmp", make_dir=False)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed without fsync
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(_parent(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(src: str, dst: str) -> None:
    """Move directory ``src`` onto ``dst``, replacing an existing ``dst`` without a moment of absence
    longer than two renames, and restoring the old one if the second rename fails.
    """
    if not os.path.lexists(dst):
        os.rename(src, dst)
        _fsync_dir(_parent(dst))
        return
    old = _sibling(dst, "old", make_dir=True)
    os.rmdir(old)  # only the unique name is wanted; rename needs it absent
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _fsync_dir(_parent(dst))
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` (:func:`replace_dir`).

    Files written inside are fsynced before the switch.  If the block raises, the temporary directory
    is deleted and ``path`` is untouched.
    """
    path = os.fspath(path).rstrip("/\\") or os.fspath(path)
    tmp = _sibling(path, "tmp", make_dir=True)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def fsync_tree(root: str) -> None:
    """fsync every regular file and directory under ``root`` (so a rename publishes durable data)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def publish(stage: str, dest_dir: str, names: list[str]) -> None:
    """Move the entries ``names`` of the staging folder ``stage`` into ``dest_dir``, in that order.

    Files move with ``os.replace``, folders with :func:`replace_dir`; each move is atomic, so put the
    entry that marks completion (e.g. a manifest) last.  ``stage`` must be on the same filesystem.
    """
    for name in names:
        src, dst = os.path.join(stage, name), os.path.join(dest_dir, name)
        if os.path.isdir(src) and not os.path.islink(src):
            replace_dir(src, dst)
        else:
            os.replace(src, dst)
    _fsync_dir(dest_dir)


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Fail before minutes of work, not after, when ``folder`` (named by ``flag``) cannot be written.

    Nothing is created: the folder, or the nearest existing folder above it, takes a temporary file.
    """
    from .errors import DataError

    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise DataError(
            f"{flag} {folder} is not writable ({err.strerror or err}); pass a writable folder"
        ) from err


def json_safe(value: Any) -> Any:
    """``value`` with NaN as None, recursively: JSON has no NaN (Python would write an invalid file)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
