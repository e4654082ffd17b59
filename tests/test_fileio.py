"""fileio.py: atomic writes leave either the old or the new content, and no temporaries."""

from __future__ import annotations

import json
import os
import stat

import pytest

from qwen3vl_sft import fileio


class Boom(RuntimeError):
    pass


def test_atomic_write_bytes_and_json(tmp_path):
    target = tmp_path / "a.bin"
    fileio.atomic_write_bytes(target, b"one")
    fileio.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    fileio.atomic_write_json(tmp_path / "m.json", {"µ": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == {"µ": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "m.json"]


def test_outputs_under_missing_folders_create_them(tmp_path):
    """Bug fixed here: a first `python job.py --demo` (no demo/ folder yet) failed building the model."""
    fileio.atomic_write_json(tmp_path / "a" / "b" / "x.json", {"k": 1})
    with fileio.atomic_dir(tmp_path / "c" / "d") as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert json.loads((tmp_path / "a" / "b" / "x.json").read_text()) == {"k": 1}
    assert os.listdir(tmp_path / "c") == ["d"] and os.listdir(tmp_path / "c" / "d") == ["f"]


def test_published_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.atomic_write_bytes(tmp_path / "f", b"x")
        with fileio.atomic_dir(tmp_path / "d") as d:
            (open(os.path.join(d, "x"), "w")).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755  # not mkdtemp's 0700


def test_atomic_path_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(Boom), fileio.atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise Boom
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_dir_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    with fileio.atomic_dir(target) as tmp, open(os.path.join(tmp, "weights.bin"), "wb") as f:
        f.write(b"new")
    assert os.listdir(target) == ["weights.bin"]
    assert os.listdir(tmp_path) == ["model"]  # neither the temporary nor the old copy remains


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    with pytest.raises(Boom), fileio.atomic_dir(target) as tmp:
        with open(os.path.join(tmp, "weights.bin"), "wb") as f:
            f.write(b"half")
        raise Boom
    assert (target / "weights.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model"]


def test_replace_dir_restores_the_old_directory_if_the_swap_fails(tmp_path, monkeypatch):
    src, dst = tmp_path / "new", tmp_path / "cur"
    src.mkdir()
    dst.mkdir()
    (dst / "keep").write_bytes(b"old")
    real_rename = os.rename

    def rename(a, b):
        if os.fspath(a) == os.fspath(src):
            raise OSError("simulated failure")
        return real_rename(a, b)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        fileio.replace_dir(str(src), str(dst))
    assert (dst / "keep").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["cur", "new"]


def test_publish_moves_files_and_folders_in_order(tmp_path):
    stage, dest = tmp_path / "stage", tmp_path / "dest"
    (stage / "site-1").mkdir(parents=True)
    (stage / "site-1" / "train.json").write_text("[]")
    (stage / "manifest.json").write_text("{}")
    (dest / "site-1").mkdir(parents=True)
    (dest / "site-1" / "old.json").write_text("[1]")
    fileio.publish(str(stage), str(dest), ["site-1", "manifest.json"])
    assert sorted(os.listdir(dest)) == ["manifest.json", "site-1"]
    assert os.listdir(dest / "site-1") == ["train.json"]
    assert os.listdir(stage) == []
